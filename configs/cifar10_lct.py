"""Improved latent consistency training (Dao et al. 2025) on CIFAR-10 in the 8x8x4 latent space of
cifar10_autoencoder, with the paper's whole recipe (Cauchy loss with adaptive c, early-time diffusion loss, exact
minibatch OT, non-scaling LayerNorm, per-element latent statistics).

Commands (the autoencoder, the latent cache, then training):
  python -m cm_jax.main --config=configs/cifar10_autoencoder.py --workdir=runs/cifar10_autoencoder
  python -m cm_jax.main --config=configs/cifar10_lct.py --workdir=runs/cifar10_lct --mode=encode
  python -m cm_jax.main --config=configs/cifar10_lct.py --workdir=runs/cifar10_lct
Hardware: sized for 8 GPUs or a TPU v4-32 slice; batch 512.
Batch 512, 400k iterations, RAdam lr 1e-4, weight decay 1e-4, eps 1e-4, EMA 0.9999, curriculum 10 -> 640, DDPM++ at
8x8 (channels 128, widths (2, 2), 4 blocks, attention at 8 and 4) with non-scaling LayerNorm, dropout 0.1.
FID: no published number (the paper's data sets are 256x256; see celebahq256_lct.py).
"""

import ml_collections

from cm_jax.objectives import objective_config
from configs import base
from configs import celebahq256_lct
from configs import cifar10_edm


def get_config():
  c = base.get_config()
  cifar10_edm.cifar10(c, 'ddpmpp', dropout=0.1)
  c.model.update(channel_mult=(2, 2), attn_resolutions=(8, 4), norm='nsln')
  c.latent.update(autoencoder='runs/cifar10_autoencoder', cache='runs/cifar10_latents', normalization='per_element')
  c.objective = objective_config(**celebahq256_lct.LCT)
  c.optim = ml_collections.ConfigDict(dict(
      name='radam', learning_rate=1e-4, b1=0.9, b2=0.999, eps=1e-4, warmup_steps=0, grad_clip=0.0, weight_decay=1e-4))
  c.ema.rates = (0.9999,)
  c.train.update(batch_size=512, num_steps=400_000, log_every=1000)
  c.checkpoint.every_steps = 10_000
  c.sampling.mid_sigmas = (0.821,)
  return c
