"""Improved latent consistency training (Dao et al. 2025, "Improved Training Technique for Latent Consistency
Models") on CelebA-HQ 256x256 in Stable Diffusion's VAE latent space (32x32x4), unconditional.

Commands (a diffusers VAE folder, e.g. stabilityai/sd-vae-ft-ema, and the images as root/train/<class>/*.jpg; the
latent cache with its per-element statistics first):
  python -m cm_jax.main --config=configs/celebahq256_lct.py --workdir=runs/celebahq256_lct --mode=encode \
      --config.latent.autoencoder=/path/to/sd-vae-ft-ema --config.data.path=/path/to/celebahq256
  python -m cm_jax.main --config=configs/celebahq256_lct.py --workdir=runs/celebahq256_lct \
      --config.latent.autoencoder=/path/to/sd-vae-ft-ema --config.data.path=/path/to/celebahq256
Hardware: sized for 8 GPUs or a TPU v4-32 slice; batch 128, bfloat16 compute.
Batch 128, 1.4M iterations (unverified), RAdam lr 1e-4, weight decay 1e-4, eps 1e-4, EMA 0.9999; iCT's
lognormal indices (-1.1, 2.0), weight 1 / (sigma_{i+1} - sigma_i), sg target, curriculum 10 -> 640; Cauchy loss
with adaptive c, the early-time diffusion loss (x5, the quarter of pairs nearest sigma_min), exact minibatch OT per
device, non-scaling LayerNorm; latents x / 0.18215 normalised per element (x - mu) / s * 0.5 with the cache's
statistics. Sources: the reference sheet, section 7b (the paper's code settings). The network is EDM's ADM at 32x32
(channels 128, widths (1, 2, 2, 2), 2 blocks, attention at 16 and 8): unverified, the paper's network is not in the
reference. 2-step sampling at sigma 0.821 (iCT's CIFAR-10 value; unverified for latents).
Paper FID (1 step / 2 steps): 7.27 / 6.93 (latent iCT: 37.15 / 16.84, configs/celebahq256_ilct.py).
"""

import ml_collections

from cm_jax.objectives import objective_config
from configs import base

ADM_32 = dict(name='adm', remat='', channels=128, channel_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16, 8),
              head_dim=64, dropout=0.0, num_classes=0, label_dropout=0.0, time_embedding='positional',
              time_scale=1000.0, emb_mult=4, adaptive_norm='scale_shift', dtype='bfloat16', norm='nsln')
LCT = dict(name='ict', s0=10, s1=640, p_mean=-1.1, p_std=2.0, distance='cauchy', c_schedule='adaptive',
           distance_c=0.0, diffusion_loss_weight=5.0, diffusion_loss_fraction=0.25, coupling='exact',
           sinkhorn_epsilon=0.05)


def lct256(c, data_path: str, cache: str):
  """CelebA-HQ / FFHQ / LSUN-Church 256 through Stable Diffusion's VAE with improved latent CT's recipe."""
  c.data.update(name='image_folder', path=data_path, image_size=256)
  c.latent.update(autoencoder='sd-vae-ft-ema', cache=cache, normalization='per_element')
  c.model = ml_collections.ConfigDict(ADM_32)
  c.objective = objective_config(**LCT)
  c.optim = ml_collections.ConfigDict(dict(
      name='radam', learning_rate=1e-4, b1=0.9, b2=0.999, eps=1e-4, warmup_steps=0, grad_clip=0.0, weight_decay=1e-4))
  c.ema.rates = (0.9999,)
  c.train.update(batch_size=128, num_steps=1_400_000, log_every=1000)
  c.checkpoint.every_steps = 10_000
  c.sampling.update(mid_sigmas=(0.821,), num_grid=16)
  c.eval.proxy = False
  return c


def get_config():
  return lct256(base.get_config(), 'celebahq256', 'runs/celebahq256_latents')
