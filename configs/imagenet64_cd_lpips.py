"""Consistency distillation with LPIPS on class-conditional ImageNet-64 (CM paper), from the ADM EDM teacher.

Commands (the teacher first; LPIPS weights at config.objective.lpips_weights, format in cm_jax/lpips.py):
  python -m cm_jax.main --config=configs/imagenet64_edm.py --workdir=runs/imagenet64_edm
  python -m cm_jax.main --config=configs/imagenet64_cd_lpips.py --workdir=runs/imagenet64_cd_lpips
Hardware: sized for 64 A100 GPUs (count unverified: the CM paper says "a cluster of A100 GPUs", the launch script
runs 8 MPI processes per command) or a TPU v4-128 slice; bfloat16 compute (the code: --use_fp16 True).
Batch 2048, 600k iterations, RAdam lr 8e-6 (torch defaults: betas 0.9 / 0.999, eps 1e-8; no schedule), N = 40,
Heun teacher step, fixed target EMA mu = 0.95, EMA 0.9999432189950708, dropout 0 (teacher 0.1, evaluated in eval
mode), uniform weighting, initialised from the teacher: openai/consistency_models scripts/launch.sh ("L_CD^N
(LPIPS) on ImageNet-64"), cm/train_util.py (RAdam), cm/karras_diffusion.py (Heun with the teacher),
scripts/cm_train.py (teacher -> student copy). The code keeps three EMAs (0.999, 0.9999, 0.9999432...); which one
gave the paper's FID is not stated, and this config samples the last.
2-step sampling at index 22 of the 40-point grid (sigma 1.382): launch.sh "--sampler multistep --ts 0,22,39
--steps 40", found by scripts/ternary_search.py.
Paper FID: 1 step 6.20, 2 steps 4.70.
"""

import ml_collections

from configs import base
from configs import imagenet64_edm


def get_config():
  c = base.get_config()
  imagenet64_edm.imagenet64(c, dropout=0.0)
  c.objective = ml_collections.ConfigDict(dict(
      name='cd', num_scales=40, solver='heun', target_ema=0.95, distance='lpips',
      lpips_weights='weights/lpips_vgg16.npz'))
  c.teacher = ml_collections.ConfigDict(dict(workdir='runs/imagenet64_edm', init=True))
  c.optim = ml_collections.ConfigDict(dict(
      name='radam', learning_rate=8e-6, b1=0.9, b2=0.999, eps=1e-8, warmup_steps=0, grad_clip=0.0))
  c.ema.rates = (imagenet64_edm.EMA_RATE,)
  c.train.batch_size = 2048
  c.train.num_steps = 600_000
  c.train.log_every = 1000
  c.checkpoint.every_steps = 10_000
  c.sampling.mid_sigmas = ()
  c.sampling.mid_indices = (22,)
  c.sampling.index_grid_size = 40
  c.sampling.clip_denoised = True  # scripts/image_sample.py: clip_denoised=True clamps every x0 to [-1, 1]
  return c
