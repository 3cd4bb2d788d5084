"""Improved consistency training (iCT, Song and Dhariwal 2023) on CIFAR-10, NCSN++, no teacher.

Command:
  python -m cm_jax.main --config=configs/cifar10_ict.py --workdir=runs/cifar10_ict
Hardware: sized for 8 A100 GPUs (iCT's CIFAR-10 runs); a TPU v4-32 slice takes the same global batch.
Batch 1024, 400k iterations, Adam lr 1e-4, beta2 0.995, dropout 0.3, pseudo-Huber (c = 0.00054 sqrt(D)),
lognormal index distribution (-1.1, 2.0), curriculum s0 = 10 -> s1 = 1280, theta- = sg(theta), EMA 0.99993.
Paper FID: 1 step 2.83, 2 steps 2.46.
"""

import ml_collections

from configs import base
from configs import cifar10_edm


def get_config(num_res_blocks=4):
  c = base.get_config()
  cifar10_edm.cifar10(c, 'ncsnpp', dropout=0.3)
  c.model.num_res_blocks = num_res_blocks
  c.objective = ml_collections.ConfigDict(dict(
      name='ict', s0=10, s1=1280, p_mean=-1.1, p_std=2.0, distance='pseudo_huber'))
  c.optim = ml_collections.ConfigDict(dict(
      name='adam', learning_rate=1e-4, b1=0.9, b2=0.995, eps=1e-8, warmup_steps=0, grad_clip=0.0))
  c.ema.rates = (0.99993,)
  c.train.batch_size = 1024
  c.train.num_steps = 400_000
  c.train.log_every = 1000
  c.checkpoint.every_steps = 10_000
  c.sampling.mid_sigmas = (0.821,)
  return c
