"""KL autoencoder (diffusers AutoencoderKL layout) on the built-in 8x8 digits: the latent space of the digits latent
experiments (digits_latent_ddpm, digits_lcd, digits_lcf, digits_lcm_lora, digits_lct).

Command:
  python -m cm_jax.main --config=configs/digits_autoencoder.py --workdir=runs/digits_autoencoder
Hardware: 2 CPU cores, minutes (BUILD_NOTES.md).
Expected: the run exports itself to runs/digits_autoencoder/autoencoder (config.json +
diffusion_pytorch_model.safetensors, loadable by diffusers) with latents of shape 4x4x2 and its scaling factor, and
prints the digits-proxy Frechet distance of reconstructed held-out digits (BUILD_NOTES.md), a floor for every latent
model on it. Later runs name it: --config.latent.autoencoder=runs/digits_autoencoder.
One downsampling level (8x8 -> 4x4), 2 latent channels (32 numbers for 64 pixels), widths 16 / 32, GroupNorm with
4 groups, the mid-block attention of Stable Diffusion's VAE. Loss: mean |x - x'| + 1e-3 KL (per-element means).
"""

import ml_collections

from cm_jax.objectives import objective_config
from configs import digits_edm


def get_config():
  c = digits_edm.get_config()
  c.model = ml_collections.ConfigDict(dict(
      name='autoencoder_kl', in_channels=1, block_out_channels=(16, 32), layers_per_block=1, latent_channels=2,
      norm_num_groups=4, mid_block_add_attention=True, use_quant_conv=True, use_post_quant_conv=True))
  c.objective = objective_config(
      name='autoencoder', reconstruction='l1', kl_weight=1e-3, lpips_weight=0.0, lpips_weights='',
      scale_records=2048)
  c.train.num_steps = 3000
  c.optim.learning_rate = 1e-3
  c.ema.rates = (0.999,)
  c.checkpoint.every_steps = 1000
  c.sampling.grid_every = 0
  return c
