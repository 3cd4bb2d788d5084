"""Consistency distillation with LPIPS on class-conditional ImageNet-64 (CM paper), from the ADM EDM teacher.

Command (LPIPS weights at config.objective.lpips_weights, format in cm_jax/lpips.py). The teacher is the CM paper's
own, released: download https://openaipublic.blob.core.windows.net/consistency/edm_imagenet64_ema.pt to weights/ (or
point --config.teacher.checkpoint at it); the network is the CM code's UNet (model.layout='guided_diffusion'):
  python -m cm_jax.main --config=configs/imagenet64_cd_lpips.py --workdir=runs/imagenet64_cd_lpips
Arg 'edm_adm': EDM's released ImageNet-64 ADM (https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/
edm-imagenet-64x64-cond-adm.pkl, EDM's DhariwalUNet: model.layout='edm') as the teacher instead:
  python -m cm_jax.main --config=configs/imagenet64_cd_lpips.py:edm_adm --workdir=runs/imagenet64_cd_lpips_edm
A cm_jax teacher run instead (cm_jax's ADM layout):
  python -m cm_jax.main --config=configs/imagenet64_edm.py --workdir=runs/imagenet64_edm
  python -m cm_jax.main --config=configs/imagenet64_cd_lpips.py:cm_jax --workdir=runs/imagenet64_cd_lpips
Hardware: sized for 64 A100 GPUs (count unverified: the CM paper says "a cluster of A100 GPUs", the launch script
runs 8 MPI processes per command) or a TPU v4-128 slice; float32 compute with the CM paper's UNet (its layout
runs in float32 only; the code: --use_fp16 True), bfloat16 with the other teachers' networks.
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

from cm_jax.models import checkpoints
from cm_jax.objectives import objective_config
from configs import base
from configs import imagenet64_edm

# teacher arg -> (the teacher: a released file or a cm_jax run's workdir, the network's layout fields).
TEACHERS = {
    'cm': (dict(checkpoint='weights/edm_imagenet64_ema.pt'),
           dict(checkpoints.CM_CONFIGS['imagenet64'][1], dtype='float32')),  # the layout runs in float32
    'edm_adm': (dict(checkpoint='weights/edm-imagenet-64x64-cond-adm.pkl'),
                dict(layout='edm', time_scale=1.0, resblock_updown=False)),
    'cm_jax': (dict(workdir='runs/imagenet64_edm'), {}),
}


def get_config(teacher='cm'):
  c = base.get_config()
  imagenet64_edm.imagenet64(c, dropout=0.0)
  if teacher not in TEACHERS:
    raise ValueError(f'configs/imagenet64_cd_lpips.py:{teacher}: expected one of {sorted(TEACHERS)}.')
  source, network = TEACHERS[teacher]
  c.model.update({k: v for k, v in network.items() if k not in ('dropout', 'label_dropout')})
  c.objective = objective_config(
      name='cd', num_scales=40, solver='heun', target_ema=0.95, distance='lpips',
      lpips_weights='weights/lpips_vgg16.npz')
  c.teacher = ml_collections.ConfigDict(dict(dict(workdir='', checkpoint=''), **source, init=True))
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
