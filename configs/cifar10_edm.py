"""EDM diffusion teacher on CIFAR-10 (Karras et al. 2022), unconditional: the teacher of CD and ECT.

Commands (arg 'ncsnpp', the default: CM's teacher for cifar10_cd_*; arg 'ddpmpp': ECT's teacher):
  python -m cm_jax.main --config=configs/cifar10_edm.py --workdir=runs/cifar10_edm
  python -m cm_jax.main --config=configs/cifar10_edm.py:ddpmpp --workdir=runs/cifar10_edm_ddpmpp
Hardware: sized for 8 A100 GPUs (EDM: about 2 days); on a TPU v4-32 slice the same global batch.
Batch 512, 400k iterations (EDM's 200 Mimg), Adam lr 1e-3 with a 10 Mimg ramp-up, dropout 0.13, EMA 0.99929
(half-life 0.5 Mimg at batch 512). Network: NCSN++ 56.4M / DDPM++ 55.7M parameters.
Paper FID: 1.97 with the 18-step Heun sampler (35 NFE); a diffusion model has no 1- or 2-step FID.
Not implemented: EDM's non-leaking augmentation (p = 0.12), which EDM used for this result.
"""

import ml_collections

from configs import base

# NCSN++ and DDPM++ as configured for CIFAR-10 in EDM (models/ncsnpp.py): 128 channels, mult (2, 2, 2),
# 4 blocks per level, attention at 16x16. c_noise = 0.25 ln(sigma) (parameterization.py).
NCSNPP = dict(name='ncsnpp', channels=128, channel_mult=(2, 2, 2), num_res_blocks=4, attn_resolutions=(16,),
              dropout=0.0, num_classes=0, label_dropout=0.0, time_embedding='fourier', time_scale=16.0,
              noise_mult=2, emb_mult=4, residual_input=True, resample_filter=(1, 3, 3, 1),
              adaptive_norm='shift', dtype='float32')
DDPMPP = dict(NCSNPP, time_embedding='positional', time_scale=1.0, noise_mult=1, residual_input=False,
              resample_filter=(1, 1))
NETWORKS = {'ncsnpp': NCSNPP, 'ddpmpp': DDPMPP}


def cifar10(c, network, dropout):
  """Sets CIFAR-10 data and the named CIFAR-10 network with its dropout on config c."""
  c.data.name = 'cifar10'
  c.model = ml_collections.ConfigDict(dict(NETWORKS[network], dropout=dropout))
  c.sampling.num_grid = 64
  c.eval.proxy = False


def get_config(arg='ncsnpp'):
  c = base.get_config()
  cifar10(c, arg, dropout=0.13)
  c.objective = ml_collections.ConfigDict(dict(name='edm', p_mean=-1.2, p_std=1.2))
  c.optim = ml_collections.ConfigDict(dict(
      name='adam', learning_rate=1e-3, b1=0.9, b2=0.999, eps=1e-8, warmup_steps=19_531, grad_clip=0.0))
  c.ema.rates = (0.99929,)
  c.train.batch_size = 512
  c.train.num_steps = 400_000
  c.train.log_every = 1000
  c.checkpoint.every_steps = 10_000
  c.sampling.teacher_steps = 18
  return c
