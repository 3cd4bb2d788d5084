"""EDM diffusion teacher on class-conditional ImageNet-64 (Karras et al. 2022, ADM network): CM's CD teacher.

Command:
  python -m cm_jax.main --config=configs/imagenet64_edm.py --workdir=runs/imagenet64_edm
Hardware: sized for 32 A100 GPUs (EDM: about 13 days) or a TPU v4-64 slice; bfloat16 compute.
Batch 4096, 610k iterations (EDM's 2500 Mimg), Adam lr 1e-4 with a 10 Mimg ramp-up, dropout 0.1,
EMA 0.999943 (half-life 50 Mimg at batch 4096). Network: ADM, 192 channels, 295.9M parameters.
Paper FID: 2.44 with the deterministic Heun sampler at 79 NFE (40 steps); no 1- or 2-step FID for a diffusion model.
For classifier-free guidance (sCD's guided teacher), train with --config.model.label_dropout=0.1.
"""

import ml_collections

from configs import base

# EDM's ADM for ImageNet-64 (models/adm.py). c_noise: the CM PyTorch code feeds 1000 * 0.25 ln(sigma) to the
# positional embedding, hence time_scale 1000 on this code's c_noise = 0.25 ln(sigma).
ADM = dict(name='adm', channels=192, channel_mult=(1, 2, 3, 4), num_res_blocks=3, attn_resolutions=(32, 16, 8),
           head_dim=64, dropout=0.0, num_classes=1000, label_dropout=0.0, time_embedding='positional',
           time_scale=1000.0, emb_mult=4, adaptive_norm='scale_shift', dtype='bfloat16')


def imagenet64(c, dropout):
  """Sets ImageNet-64 data and the ADM network with its dropout on config c."""
  c.data.name = 'imagenet_resized/64x64'
  c.model = ml_collections.ConfigDict(dict(ADM, dropout=dropout))
  c.sampling.num_grid = 64
  c.eval.proxy = False


def get_config():
  c = base.get_config()
  imagenet64(c, dropout=0.1)
  c.objective = ml_collections.ConfigDict(dict(name='edm', p_mean=-1.2, p_std=1.2))
  c.optim = ml_collections.ConfigDict(dict(
      name='adam', learning_rate=1e-4, b1=0.9, b2=0.999, eps=1e-8, warmup_steps=2441, grad_clip=0.0))
  c.ema.rates = (0.999943,)
  c.train.batch_size = 4096
  c.train.num_steps = 610_000
  c.train.log_every = 1000
  c.checkpoint.every_steps = 10_000
  c.sampling.teacher_steps = 40
  return c
