"""TrigFlow diffusion teacher on class-conditional ImageNet-64 (sCM, Lu and Song 2024): imagenet64_sct's ADM network.

Command:
  python -m cm_jax.main --config=configs/imagenet64_trigflow.py --workdir=runs/imagenet64_trigflow
Hardware: a TPU slice or GPU node (sized like imagenet64_cd_lpips: 64 GPUs); not run in this project.
The teacher of imagenet64_scd (`--config.teacher.workdir=runs/imagenet64_trigflow`), and the diffusion step that
imagenet64_sct's and imagenet64_scd's pre-flight step times are compared with (BUILD_NOTES, issue 15).
Settings: v-prediction with c_noise(t) = t, tau ~ N(-1.0, 1.6^2) (reference section 5, ImageNet-64), sCM's adaptive
weighting exp(-w(t)) L_t + w(t) as cifar10_trigflow; network, optimiser, batch 2048, EMA half-life, bfloat16 compute
and 400k iterations as imagenet64_sct (*unverified* for ImageNet-64: the reference gives no teacher batch or duration).
Paper FID: none published for this teacher (sCM's ImageNet-64 teachers are EDM2-style networks). Not reproduced here.
"""

from cm_jax.objectives import objective_config
from configs import imagenet64_sct


def get_config():
  c = imagenet64_sct.get_config()
  c.objective = objective_config(name='trigflow', p_mean=-1.0, p_std=1.6, adaptive_weighting=True)
  c.sampling.mid_sigmas = ()
  return c
