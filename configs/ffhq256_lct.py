"""Improved latent consistency training (Dao et al. 2025) on FFHQ 256x256 in Stable Diffusion's VAE latent space.

Commands: as configs/celebahq256_lct.py, with this config and the FFHQ images (root/train/<class>/*.png).
Hardware: sized for 8 GPUs or a TPU v4-32 slice; batch 128, bfloat16 compute.
Batch 128 and every other setting as celebahq256_lct.py (the paper uses one recipe for its three data sets).
Paper FID (1 step / 2 steps): 8.72 / 8.29.
"""

from configs import base
from configs import celebahq256_lct


def get_config():
  return celebahq256_lct.lct256(base.get_config(), 'ffhq256', 'runs/ffhq256_latents')
