"""Improved latent consistency training (Dao et al. 2025) on LSUN Church 256x256 in Stable Diffusion's VAE latent space.

Commands: as configs/celebahq256_lct.py, with this config and the LSUN Church images (root/train/<class>/*.jpg,
resized to 256x256 by data.image_size).
Hardware: sized for 8 GPUs or a TPU v4-32 slice; batch 128, bfloat16 compute.
Batch 128 and every other setting as celebahq256_lct.py.
Paper FID (1 step / 2 steps): 8.87 / 7.71.
"""

from configs import base
from configs import celebahq256_lct


def get_config():
  return celebahq256_lct.lct256(base.get_config(), 'lsun_church256', 'runs/lsun_church256_latents')
