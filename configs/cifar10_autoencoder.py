"""KL autoencoder (diffusers AutoencoderKL layout) on CIFAR-10: the latent space of the CIFAR-10 latent configs
(cifar10_latent_ddpm, cifar10_lcd, cifar10_lcm_lora, cifar10_lct), 32x32x3 -> 8x8x4 latents (f = 4).

Command:
  python -m cm_jax.main --config=configs/cifar10_autoencoder.py --workdir=runs/cifar10_autoencoder
Hardware: one accelerator (a GPU or a TPU v4-8) for hours; batch 256, 100k iterations.
Batch 256, 100k iterations, Adam lr 4.5e-6 x batch as in latent diffusion (here 1e-4 with 1k warm-up steps), l1
reconstruction + 1e-6 KL (per-element means), widths 64 / 128 / 128 with 2 resnets per level, GroupNorm 32, the
mid-block attention of Stable Diffusion's VAE. The run exports itself to WORKDIR/autoencoder (config.json +
diffusion_pytorch_model.safetensors, scaling_factor = 1 / std of the latents). Latent diffusion's autoencoders add an
LPIPS and a patch-GAN term: set objective.lpips_weight (and objective.lpips_weights, LPIPS VGG weights, see
BUILD_NOTES.md); there is no GAN term in cm_jax.
FID: no published number for this autoencoder (cm_jax's own latent space); its reconstruction error is printed.
"""

import ml_collections

from cm_jax.objectives import objective_config
from configs import base


def get_config():
  c = base.get_config()
  c.data.name = 'cifar10'
  c.model = ml_collections.ConfigDict(dict(
      name='autoencoder_kl', in_channels=3, block_out_channels=(64, 128, 128), layers_per_block=2, latent_channels=4,
      norm_num_groups=32, mid_block_add_attention=True, use_quant_conv=True, use_post_quant_conv=True))
  c.objective = objective_config(
      name='autoencoder', reconstruction='l1', kl_weight=1e-6, lpips_weight=0.0, lpips_weights='',
      scale_records=10_000)
  c.optim.update(learning_rate=1e-4, warmup_steps=1000)
  c.ema.rates = (0.999,)
  c.train.update(batch_size=256, num_steps=100_000, log_every=1000)
  c.checkpoint.every_steps = 10_000
  c.sampling.num_grid = 64
  return c
