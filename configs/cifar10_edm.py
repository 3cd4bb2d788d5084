"""EDM diffusion teacher on CIFAR-10 (Karras et al. 2022), unconditional: the teacher of CD and ECT.

Commands (arg 'ncsnpp', the default: CM's teacher for cifar10_cd_*; arg 'ddpmpp': ECT's teacher):
  python -m cm_jax.main --config=configs/cifar10_edm.py --workdir=runs/cifar10_edm
  python -m cm_jax.main --config=configs/cifar10_edm.py:ddpmpp --workdir=runs/cifar10_edm_ddpmpp
Hardware: sized for 8 GPUs (EDM README: 8xV100, ~2 days per CIFAR-10 model); a TPU v4-32 slice takes the same
global batch.
Batch 512, 400k iterations, Adam lr 1e-3 (betas 0.9 / 0.999, eps 1e-8) with a linear 10 Mimg ramp-up (19,531
iterations), dropout 0.13, EMA 0.5^(512 / 0.5e6) = 0.999290 (half-life 0.5 Mimg). This is the CM JAX code's teacher
recipe (openai/consistency_models_cifar10 configs/cifar10_k_ve.py: n_iters 400001); EDM's own runs stop at 200 Mimg
(390,625 iterations) and add an EMA ramp-up (ratio 0.05) that cm_jax does not have. Network: NCSN++ 56.4M / DDPM++
55.7M parameters.
Paper FID: 1.97 with the 18-step Heun sampler (35 NFE; EDM README abstract: EDM's best unconditional CIFAR-10
result; which of its two networks gave it, and the other one's figure, are unverified here); a diffusion model has
no 1- or 2-step FID.
Not implemented: EDM's non-leaking augmentation (train.py default --augment=0.12, used for that 1.97) and the
CM JAX code's random horizontal flip (random_flip=True); cm_jax has no augmentation key.
"""

import ml_collections

from cm_jax import schedules
from cm_jax.objectives import objective_config
from configs import base

# NCSN++ and DDPM++ as configured for CIFAR-10 in EDM (models/ncsnpp.py): 128 channels, mult (2, 2, 2),
# 4 blocks per level, attention at 16x16. c_noise = 0.25 ln(sigma) (parameterization.py), fed unscaled to a
# Fourier embedding of scale 16 (CM JAX code: jcm/models/utils.py cond_t = 0.25 log t, fourier_scale 16).
NCSNPP = dict(name='ncsnpp', remat='', channels=128, channel_mult=(2, 2, 2), num_res_blocks=4, attn_resolutions=(16,),
              dropout=0.0, num_classes=0, label_dropout=0.0, time_embedding='fourier', time_scale=16.0,
              noise_mult=2, emb_mult=4, residual_input=True, resample_filter=(1, 3, 3, 1),
              adaptive_norm='shift', dtype='float32')
DDPMPP = dict(NCSNPP, time_embedding='positional', time_scale=1.0, noise_mult=1, residual_input=False,
              resample_filter=(1, 1))
NETWORKS = {'ncsnpp': NCSNPP, 'ddpmpp': DDPMPP}
BATCH = 512


def cifar10(c, network, dropout):
  """Sets CIFAR-10 data and the named CIFAR-10 network with its dropout on config c."""
  c.data.name = 'cifar10'
  c.model = ml_collections.ConfigDict(dict(NETWORKS[network], dropout=dropout))
  c.sampling.num_grid = 64
  c.eval.proxy = False


def get_config(arg='ncsnpp'):
  c = base.get_config()
  cifar10(c, arg, dropout=0.13)
  c.objective = objective_config(name='edm', p_mean=-1.2, p_std=1.2)
  c.optim = ml_collections.ConfigDict(dict(
      name='adam', learning_rate=1e-3, b1=0.9, b2=0.999, eps=1e-8, warmup_steps=19_531, grad_clip=0.0))
  c.ema.rates = (schedules.ema_rate_from_halflife(0.5e6, BATCH),)
  c.train.batch_size = BATCH
  c.train.num_steps = 400_000
  c.train.log_every = 1000
  c.checkpoint.every_steps = 10_000
  c.sampling.teacher_steps = 18
  return c
