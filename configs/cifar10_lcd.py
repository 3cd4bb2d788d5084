"""Latent consistency distillation (LCD, Luo et al. 2023) of cifar10_latent_ddpm, with LCM's settings: one DDIM step
of the classifier-free-guided PF-ODE over k = 20 of the 1000 timesteps, guidance scale s = 1 + w with w ~ U[5, 15]
fed to the student (sinusoids of 1000 s through a zero-initialised layer), EMA target 0.95, l2 loss, gradient clip 1.

Commands (the autoencoder and the teacher first, see cifar10_latent_ddpm.py):
  python -m cm_jax.main --config=configs/cifar10_lcd.py --workdir=runs/cifar10_lcd
Hardware: 8 GPUs or a TPU v4-32 slice; batch 512, 50k iterations (LCM trains for 100k at batch 72 x 8 on LAION).
Batch 512, 50k iterations, Adam lr 8e-6 (LCM's), the student initialised from the teacher. Samples with LCM's
multistep sampler at 1, 2 and 4 steps, s = 9.5 (w = 8.5, LCM's default). The range w ~ U[5, 15] is the reference
code's for Stable Diffusion; a CIFAR-10 teacher may want a smaller one (the digits config uses s ~ U[1, 3]).
FID: no published CIFAR-10 number (see cifar10_latent_ddpm.py).
"""

from cm_jax.objectives import objective_config
from configs import cifar10_latent_ddpm


def get_config():
  c = cifar10_latent_ddpm.get_config()
  c.teacher.update(workdir='runs/cifar10_latent_ddpm', init=True)
  c.objective = objective_config(
      name='lcd', skip=20, guidance_scale=(6.0, 16.0), target_ema=0.95, distance='l2', distance_c=0.0)
  c.model.update(guidance_embedding=True, dropout=0.0)
  c.optim.update(learning_rate=8e-6, warmup_steps=0, grad_clip=1.0)
  c.train.num_steps = 50_000
  c.sampling.guidance_scale = 9.5
  return c
