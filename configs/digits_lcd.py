"""Latent consistency distillation (LCD, Luo et al. 2023) of the guided digits_latent_ddpm teacher: one DDIM step of
the classifier-free-guided PF-ODE over the skipping interval k = 20, guidance scale s ~ U[1, 3] per example fed to the
student through its guidance embedding (LCM's w-embedding, s = 1 + w), EMA target 0.95, l2 loss.

Commands (the autoencoder, the teacher, then LCD from the teacher's parameters):
  python -m cm_jax.main --config=configs/digits_autoencoder.py --workdir=runs/digits_autoencoder
  python -m cm_jax.main --config=configs/digits_latent_ddpm.py --workdir=runs/digits_latent_ddpm
  python -m cm_jax.main --config=configs/digits_lcd.py --workdir=runs/digits_lcd \
      --config.teacher.workdir=runs/digits_latent_ddpm
Hardware: 2 CPU cores, minutes (BUILD_NOTES.md).
Expected: the digits-proxy table of the teacher (DDIM) and LCD at 1, 2 and 4 LCM steps, all sampled at guidance scale
sampling.guidance_scale (BUILD_NOTES.md, "latent family").
"""

from cm_jax.objectives import objective_config
from configs import digits_latent_ddpm


def get_config():
  c = digits_latent_ddpm.get_config()
  c.teacher.workdir = 'runs/digits_latent_ddpm'
  c.teacher.init = True
  c.objective = objective_config(
      name='lcd', skip=20, guidance_scale=(1.0, 3.0), target_ema=0.95, distance='l2', distance_c=0.0)
  c.model.guidance_embedding = True
  c.train.num_steps = 4000
  c.optim.learning_rate = 2e-4
  c.optim.grad_clip = 1.0
  return c
