"""TrigFlow diffusion teacher on CIFAR-10 (sCM, Lu and Song 2024): DDPM++ with sCM's stability changes.

Command:
  python -m cm_jax.main --config=configs/cifar10_trigflow.py --workdir=runs/cifar10_trigflow
Hardware: a TPU slice or GPU node (sized like cifar10_edm: 8 GPUs); not run in this project.
Batch 512, 400k iterations: *unverified* defaults (the reference does not state them; the third-party
re-implementation revsic/torch-flow-models trains sCT for 400k iterations, at batch 512 in an early version of its
cifar10/sct.py and 768 in a later one).
Settings: v-prediction with c_noise(t) = t, tau ~ N(-1.0, 1.4^2); DDPM++ (models/ncsnpp.py, EDM's CIFAR-10 layout)
with a positional time embedding of 1000 t and adaptive double normalisation; RAdam lr 1e-4, betas (0.9, 0.99), no
lr schedule, EMA half-life 0.5 Mimg (reference section 5, sCM's CIFAR-10 settings). Dropout
0.2 (as sCT) and the 1000 t embedding scale are unverified; sCM publishes no code. The loss uses sCM's adaptive
weighting exp(-w(t)) L_t + w(t), as the paper's teacher does. BUILD_NOTES.md lists every source.
Paper FID: 2.15 at 35 NFE (TrigFlow DDPM++ teacher; reference section 5), no 1- or 2-step FID. Not reproduced here.
"""

import math

import ml_collections

from cm_jax import schedules
from cm_jax.objectives import objective_config
from configs import base

BATCH = 512


def get_config():
  c = base.get_config()
  c.data.name = 'cifar10'
  c.parameterization.name = 'trigflow'
  c.model = ml_collections.ConfigDict(dict(
      name='ncsnpp', remat='', channels=128, channel_mult=(2, 2, 2), num_res_blocks=4, attn_resolutions=(16,), dropout=0.2,
      num_classes=0, label_dropout=0.0, time_embedding='positional', time_scale=1000.0, noise_mult=1, emb_mult=4,
      residual_input=False, resample_filter=(1, 1), adaptive_norm='double', dtype='float32'))
  c.objective = objective_config(name='trigflow', p_mean=-1.0, p_std=1.4, adaptive_weighting=True)
  c.optim = ml_collections.ConfigDict(dict(
      name='radam', learning_rate=1e-4, b1=0.9, b2=0.99, eps=1e-8, warmup_steps=0, grad_clip=0.0))
  c.ema.rates = (schedules.ema_rate_from_halflife(0.5e6, BATCH),)
  c.train.batch_size = BATCH
  c.train.num_steps = 400_000
  c.train.log_every = 1000
  c.checkpoint.every_steps = 10_000
  c.sampling.teacher_steps = 18  # 35 NFE
  c.sampling.mid_sigmas = (0.5 * math.tan(1.1),)  # sCM's 2-step middle time t = 1.1
  c.sampling.grid_every = 10_000
  return c
