"""Consistency training with LPIPS on CIFAR-10 (CM paper), from a random initialisation (no teacher).

Command (LPIPS weights at config.objective.lpips_weights, format in cm_jax/lpips.py):
  python -m cm_jax.main --config=configs/cifar10_ct_lpips.py --workdir=runs/cifar10_ct_lpips
Hardware: sized for 8 A100 GPUs (count unverified, as cifar10_cd_lpips); a TPU v4-32 slice takes the same batch.
Batch 512, 800k iterations, RAdam lr 4e-4, N(k) from s0 = 2 to s1 = 150, mu0 = 0.9 with the official code's
mu(k) = exp(s0 ln(mu0) / (N(k) - 1)) (the paper writes N(k)), Euler step with the data as denoiser (same noise),
EMA 0.9999, dropout 0, NCSN++, random init: openai/consistency_models_cifar10 configs/cifar10_ve_ct_adaptive.py
(finetune=False, n_iters 800000) with launch.sh's --config.optim.lr=0.0004 --config.training.start_scales=2
--config.training.end_scales=150 --config.training.start_ema=0.9; the mu convention is jcm/losses.py
get_ema_scales_fn. The released CT checkpoint and its FID are checkpoint_74 (740k iterations; launch.sh evaluates
--config.eval.begin_ckpt=74), inside the 800k-iteration curriculum.
2-step sampling at index 11 of the 18-point grid: unverified (copied from CD; CT's N ends at 151).
Paper FID: 1 step 8.70, 2 steps 5.83.
"""

import ml_collections

from cm_jax.objectives import objective_config
from configs import cifar10_cd_lpips


def get_config():
  """cifar10_cd_lpips's network, optimiser, schedule and sampling, with the CT objective and no teacher."""
  c = cifar10_cd_lpips.get_config()
  c.objective = objective_config(
      name='ct', s0=2, s1=150, mu0=0.9, mu_convention='code', distance='lpips',
      lpips_weights='weights/lpips_vgg16.npz')
  c.teacher = ml_collections.ConfigDict(dict(workdir='', checkpoint='', init=False))
  return c
