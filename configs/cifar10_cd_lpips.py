"""Consistency distillation with LPIPS on CIFAR-10 (Song et al. 2023, "CM"), from the NCSN++ EDM teacher.

Commands (the teacher first; LPIPS weights at config.objective.lpips_weights, format in cm_jax/lpips.py):
  python -m cm_jax.main --config=configs/cifar10_edm.py --workdir=runs/cifar10_edm
  python -m cm_jax.main --config=configs/cifar10_cd_lpips.py --workdir=runs/cifar10_cd_lpips
Hardware: sized for 8 A100 GPUs (the CM paper trained on "a cluster of A100 GPUs"; the count is unverified); a TPU
v4-32 slice takes the same global batch.
Batch 512, 800k iterations, RAdam lr 4e-4 (betas 0.9 / 0.999, no warm-up in effect), N = 18, Heun teacher step,
mu = 0 (target = sg(theta)), EMA 0.9999, dropout 0, initialised from the teacher: the official JAX code
(openai/consistency_models_cifar10 configs/cifar10_ve_cd.py and launch.sh: --config.optim.lr=0.0004; the RAdam
branch of jcm/losses.py ignores optim.warmup). The released checkpoint is checkpoint_80 (800k iterations).
2-step sampling at index 11 of the 18-point grid (sigma 0.585; ts = [0, 11, 17]): the index is unverified (not in
the JAX code's configs or launch.sh).
Paper FID: 1 step 3.55, 2 steps 2.93.
"""

import ml_collections

from cm_jax.objectives import objective_config
from configs import base
from configs import cifar10_edm


def get_config(distance='lpips'):
  c = base.get_config()
  cifar10_edm.cifar10(c, 'ncsnpp', dropout=0.0)
  c.objective = objective_config(
      name='cd', num_scales=18, solver='heun', target_ema=0.0, distance=distance)
  if distance == 'lpips':
    c.objective.lpips_weights = 'weights/lpips_vgg16.npz'
  c.teacher = ml_collections.ConfigDict(dict(workdir='runs/cifar10_edm', checkpoint='', init=True))
  c.optim = ml_collections.ConfigDict(dict(
      name='radam', learning_rate=4e-4, b1=0.9, b2=0.999, eps=1e-8, warmup_steps=0, grad_clip=0.0))
  c.ema.rates = (0.9999,)
  c.train.batch_size = 512
  c.train.num_steps = 800_000
  c.train.log_every = 1000
  c.checkpoint.every_steps = 10_000
  c.sampling.mid_sigmas = ()
  c.sampling.mid_indices = (11,)
  c.sampling.index_grid_size = 18
  c.sampling.clip_denoised = True  # the CM code clamps every x0 to [-1, 1] (cifar10 notebook, karras_sample)
  return c
