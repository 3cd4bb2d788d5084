"""LCM-LoRA (Luo et al. 2023) on the digits_latent_ddpm teacher: latent consistency distillation trained as rank-16
low-rank adapters on every kernel of the frozen teacher; no guidance input (the teacher's guidance s = 1.5 is distilled
in), no target network (theta- = sg(theta)). Only the adapters train and are checkpointed; samples use the teacher
merged with the EMA adapters.

Commands (the autoencoder and the teacher first; see configs/digits_latent_ddpm.py):
  python -m cm_jax.main --config=configs/digits_lcm_lora.py --workdir=runs/digits_lcm_lora \
      --config.teacher.workdir=runs/digits_latent_ddpm
Hardware: 2 CPU cores, minutes (BUILD_NOTES.md).
Expected: the digits-proxy table of the teacher (DDIM) and LCM-LoRA at 1, 2 and 4 LCM steps (BUILD_NOTES.md,
"latent family").
Deviation from the reference code, which samples w ~ U[w_min, w_max] for the teacher without showing it to the
LoRA student: cm_jax refuses a range the student cannot see (it would learn an average of differently guided flows)
and distils one scale.
"""

import ml_collections

from cm_jax.objectives import objective_config
from configs import digits_latent_ddpm


def get_config():
  c = digits_latent_ddpm.get_config()
  c.teacher.workdir = 'runs/digits_latent_ddpm'
  c.objective = objective_config(
      name='lcd', skip=20, guidance_scale=(1.5, 1.5), target_ema=0.0, distance='l2', distance_c=0.0)
  c.lora = ml_collections.ConfigDict(dict(c.lora, rank=16, alpha=16.0, rules=(r'kernel$',)))
  c.sampling.guidance_scale = 1.0  # the student has no guidance input; s = 1.5 is in its adapters
  c.train.num_steps = 4000
  c.optim.learning_rate = 1e-4  # the reference's; 1e-3 diverged late (FD 84 / 53 / 37 at 1 / 2 / 4 steps)
  c.optim.grad_clip = 1.0
  return c
