"""Consistency training with LPIPS on class-conditional ImageNet-64 (CM paper), ADM, no teacher.

Command (LPIPS weights at config.objective.lpips_weights, format in cm_jax/lpips.py):
  python -m cm_jax.main --config=configs/imagenet64_ct_lpips.py --workdir=runs/imagenet64_ct_lpips
Hardware: sized for 64 A100 GPUs (the CM paper) or a TPU v4-128 slice; bfloat16 compute (the paper: fp16).
Batch 2048, 800k iterations, RAdam lr 8e-6, N(k) from s0 = 2 to s1 = 200, mu0 = 0.95 (official code's N(k) - 1
convention), EMA 0.999943, dropout 0. 2-step sampling at index 106 of the 201-point grid (ts = 0,106,200).
Paper FID: 1 step 13.0, 2 steps 11.1.
"""

import ml_collections

from configs import base
from configs import imagenet64_edm


def get_config():
  c = base.get_config()
  imagenet64_edm.imagenet64(c, dropout=0.0)
  c.objective = ml_collections.ConfigDict(dict(
      name='ct', s0=2, s1=200, mu0=0.95, mu_convention='code', distance='lpips',
      lpips_weights='weights/lpips_vgg16.npz'))
  c.optim = ml_collections.ConfigDict(dict(
      name='radam', learning_rate=8e-6, b1=0.9, b2=0.999, eps=1e-8, warmup_steps=0, grad_clip=0.0))
  c.ema.rates = (0.999943,)
  c.train.batch_size = 2048
  c.train.num_steps = 800_000
  c.train.log_every = 1000
  c.checkpoint.every_steps = 10_000
  c.sampling.mid_sigmas = ()
  c.sampling.mid_indices = (106,)
  c.sampling.index_grid_size = 201
  return c
