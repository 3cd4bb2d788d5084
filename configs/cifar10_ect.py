"""Easy consistency tuning (ECT, Geng et al. 2024) on CIFAR-10 from the DDPM++ EDM teacher.

Command (ECT starts from EDM's released DDPM++, as the paper does: download
https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/edm-cifar10-32x32-uncond-vp.pkl to weights/, or point
--config.teacher.checkpoint at it):
  python -m cm_jax.main --config=configs/cifar10_ect.py --workdir=runs/cifar10_ect
From a cm_jax DDPM++ teacher run instead (cm_jax's own layout of the network):
  python -m cm_jax.main --config=configs/cifar10_edm.py:ddpmpp --workdir=runs/cifar10_edm_ddpmpp
  python -m cm_jax.main --config=configs/cifar10_ect.py --workdir=runs/cifar10_ect --config.teacher.checkpoint= \
    --config.teacher.workdir=runs/cifar10_edm_ddpmpp --config.model.layout=cm_jax
Hardware: sized for 2-4 GPUs (ECT README: "NGPUs=2/4 is recommended" for batch 128; its 1-hour run uses one
A100); a single TPU v4-8 host is plenty.
Batch 128, 400k iterations, RAdam lr 1e-4 (betas 0.9 / 0.999, eps 1e-8), dropout 0.2, no augmentation, q = 2, a
stage every 25k iterations, ln t ~ N(-1.1, 2^2), r = t (1 - q^-(stage+1) (1 + 8 sigmoid(-t))), unsquared l2 (c = 0)
with weighting 1 / (t - r), t unclipped and EDM's unshifted denoiser in training (data target only where r = 0),
sigma_min = 0.003 for the sampling-time scalings (ECMPrecond), EMA 0.9999, 2-step sampling at sigma 0.821,
DDPM++ 55.7M: all from the official code
(locuslab/ect run_ecm.sh, ct_train.py, training/loss.py; the stage length is --double=250 ticks of 12.8 kimg at
batch 128). run_ecm.sh itself runs 200k iterations (--duration=25.6 Mimg); the README's 400k row is the one below.
ECT tunes EDM's released edm-cifar10-32x32-uncond-vp.pkl (--transfer; trained with EDM's augmentation, VP
preconditioning): its weights are read into the EDM-preconditioned DDPM++ without the augmentation input (EDM's
map_augment is bias-free, so with no augmentation it adds nothing), as ECT's copy_params_and_buffers(require_all=False)
does; the network is EDM's SongUNet parameter for parameter (model.layout='edm', cm_jax/models/edm.py).
Paper FID: 1 step 3.60, 2 steps 2.11 (after 400k iterations; 3.86 / 2.15 after 200k, 4.54 / 2.20 after 100k).
"""

import ml_collections

from cm_jax.objectives import objective_config
from configs import base
from configs import cifar10_edm


def get_config():
  c = base.get_config()
  cifar10_edm.cifar10(c, 'ddpmpp', dropout=0.2)
  c.model.layout = 'edm'  # EDM's SongUNet, as the released pickle holds it
  c.objective = objective_config(
      name='ect', p_mean=-1.1, p_std=2.0, q=2.0, stage_steps=25_000, distance='l2_norm',
      weighting='inverse_delta')
  c.teacher = ml_collections.ConfigDict(dict(workdir='', checkpoint='weights/edm-cifar10-32x32-uncond-vp.pkl',
                                             init=True))
  c.optim = ml_collections.ConfigDict(dict(
      name='radam', learning_rate=1e-4, b1=0.9, b2=0.999, eps=1e-8, warmup_steps=0, grad_clip=0.0))
  c.ema.rates = (0.9999,)
  c.train.batch_size = 128
  c.train.num_steps = 400_000
  c.train.log_every = 1000
  c.checkpoint.every_steps = 10_000
  c.sampling.mid_sigmas = (0.821,)
  # The boundary of the sampling-time scalings (ECMPrecond eval mode, sigma_min = 0.003); training uses EDM's unshifted
  # denoiser (objectives/ect.py), so this key acts only on sampling.
  c.parameterization.sigma_min = 0.003
  c.sampling.clip_denoised = False  # ECT's generator_fn (ct_eval.py) re-noises the unclamped x0
  return c
