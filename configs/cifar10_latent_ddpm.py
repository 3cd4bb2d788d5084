"""Class-conditional DDPM teacher (epsilon prediction, scaled-linear betas over 1000 steps, label dropout 0.1 for
classifier-free guidance) in the 8x8x4 latent space of cifar10_autoencoder: the teacher of cifar10_lcd and the base
of cifar10_lcm_lora.

Commands (the autoencoder first):
  python -m cm_jax.main --config=configs/cifar10_autoencoder.py --workdir=runs/cifar10_autoencoder
  python -m cm_jax.main --config=configs/cifar10_latent_ddpm.py --workdir=runs/cifar10_latent_ddpm
Hardware: 8 GPUs or a TPU v4-32 slice; batch 512, 400k iterations.
Batch 512, 400k iterations, Adam lr 2e-4 with 5k warm-up steps, EMA 0.9999, DDPM++ at 8x8 (channels 128, widths
(2, 2), 4 blocks per level, attention at 8x8 and 4x4, positional embedding of the timestep), dropout 0.1; samples with
DDIM 50 steps at guidance scale 2. Latents encoded on the fly and scaled by the autoencoder's scaling_factor.
FID: no published number (latent consistency models were published on LAION text-to-image; this is cm_jax's
class-conditional CIFAR-10 analogue). Paper-scale text-to-image (the SD UNet and a text encoder) is out of scope.
"""

import ml_collections

from cm_jax.objectives import objective_config
from configs import base
from configs import cifar10_edm


def get_config():
  c = base.get_config()
  cifar10_edm.cifar10(c, 'ddpmpp', dropout=0.1)
  c.model.update(channel_mult=(2, 2), attn_resolutions=(8, 4), num_classes=10, label_dropout=0.1)
  c.latent.autoencoder = 'runs/cifar10_autoencoder'
  c.parameterization = ml_collections.ConfigDict(dict(
      name='vp', num_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule='scaled_linear',
      prediction='epsilon', sigma_data=0.5, timestep_scaling=10.0))
  c.objective = objective_config(name='ddpm')
  c.optim.update(learning_rate=2e-4, warmup_steps=5000)
  c.ema.rates = (0.9999,)
  c.train.update(batch_size=512, num_steps=400_000, log_every=1000)
  c.checkpoint.every_steps = 10_000
  c.sampling.update(teacher_steps=50, guidance_scale=2.0)
  c.eval.steps = (1, 2, 4)
  return c
