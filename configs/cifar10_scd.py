"""sCD on CIFAR-10 (Lu and Song 2024): distils the cifar10_trigflow teacher, initialised from it.

Commands:
  python -m cm_jax.main --config=configs/cifar10_trigflow.py --workdir=runs/cifar10_trigflow
  python -m cm_jax.main --config=configs/cifar10_scd.py --workdir=runs/cifar10_scd \
      --config.teacher.workdir=runs/cifar10_trigflow
Hardware: a TPU slice or GPU node (sized like cifar10_edm: 8 GPUs); not run in this project.
Batch 512, 400k iterations (cifar10_trigflow's; unverified).
Settings: as cifar10_sct with dx_t/dt from the teacher, no guidance (unconditional), dropout 0 (reference section 5).
Paper FID: 1 step 3.66, 2 steps 2.52 (teacher 2.15 at 35 NFE). Not reproduced here.
"""

from cm_jax.objectives import objective_config
from configs import cifar10_sct
from configs import cifar10_trigflow


def get_config():
  c = cifar10_trigflow.get_config()
  c.objective = objective_config(**dict(cifar10_sct.SCM, name='scd', teacher='trigflow',
                                        guidance_scale=(1.0, 1.0)))
  c.model.dropout = 0.0
  c.teacher.init = True
  c.sampling.clip_denoised = False  # as cifar10_sct (no sCM code)
  return c
