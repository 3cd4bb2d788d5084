"""EDM diffusion teacher on class-conditional ImageNet-64 (Karras et al. 2022, ADM network): CM's CD teacher.

Command:
  python -m cm_jax.main --config=configs/imagenet64_edm.py --workdir=runs/imagenet64_edm
Hardware: sized for 32 A100 GPUs (EDM README: 32xA100, four DGX A100 nodes, ~13 days); bfloat16 compute (EDM:
--fp16=1 --ls=100). On TPU the pre-flight refuses a v4-64 (128 images per chip do not fit a v4's HBM): take a
v4-128 or a v5p slice, or set model.remat=block (BUILD_NOTES, pre-flight table).
Batch 4096, 610k iterations (EDM's --duration=2500 Mimg), Adam lr 1e-4 (betas 0.9 / 0.999, eps 1e-8) with a linear
10 Mimg ramp-up (2,441 iterations), dropout 0.1, no augmentation, EMA 0.5^(4096 / 50e6) = 0.9999432 (--ema=50 Mimg
half-life): NVlabs/edm README's imagenet-64x64-cond-adm command, train.py and training/training_loop.py. EDM also
ramps the EMA half-life up (ratio 0.05), which cm_jax does not. Network: ADM, 192 channels, 295.9M parameters.
The CM paper's own teacher (openai/consistency_models scripts/launch.sh, edm_train.py) used the same batch, lr,
dropout and EMA but RAdam without ramp-up (cm/train_util.py); this config follows EDM's recipe.
Paper FID: 2.44 with the deterministic Heun sampler at 79 NFE (40 steps; the CM paper's table, via the reference
file); EDM's headline 1.36 uses stochastic sampling at 511 NFE. No 1- or 2-step FID for a diffusion model.
For classifier-free guidance (sCD's guided teacher), train with --config.model.label_dropout=0.1.
"""

import ml_collections

from cm_jax import schedules
from cm_jax.objectives import objective_config
from configs import base

# EDM's ADM for ImageNet-64 (models/adm.py). c_noise: the CM PyTorch code feeds 1000 * 0.25 ln(sigma) to the
# positional embedding (cm/karras_diffusion.py rescaled_t), hence time_scale 1000 on this code's c_noise.
ADM = dict(name='adm', remat='', channels=192, channel_mult=(1, 2, 3, 4), num_res_blocks=3, attn_resolutions=(32, 16, 8),
           head_dim=64, dropout=0.0, num_classes=1000, label_dropout=0.0, time_embedding='positional',
           time_scale=1000.0, emb_mult=4, adaptive_norm='scale_shift', dtype='bfloat16')
BATCH = 4096
# EDM's ImageNet-64 EMA: half-life 50 Mimg at batch 4096. The CM code uses the same per-step rate,
# 0.9999432189950708, at every batch size (scripts/launch.sh --ema_rate ...,0.9999432189950708).
EMA_RATE = schedules.ema_rate_from_halflife(50e6, BATCH)


def imagenet64(c, dropout):
  """Sets ImageNet-64 data and the ADM network with its dropout on config c."""
  c.data.name = 'imagenet_resized/64x64'
  c.model = ml_collections.ConfigDict(dict(ADM, dropout=dropout))
  c.sampling.num_grid = 64
  c.eval.proxy = False


def get_config():
  c = base.get_config()
  imagenet64(c, dropout=0.1)
  c.objective = objective_config(name='edm', p_mean=-1.2, p_std=1.2)
  c.optim = ml_collections.ConfigDict(dict(
      name='adam', learning_rate=1e-4, b1=0.9, b2=0.999, eps=1e-8, warmup_steps=2441, grad_clip=0.0))
  c.ema.rates = (EMA_RATE,)
  c.train.batch_size = BATCH
  c.train.num_steps = 610_000
  c.train.log_every = 1000
  c.checkpoint.every_steps = 10_000
  c.sampling.teacher_steps = 40
  return c
