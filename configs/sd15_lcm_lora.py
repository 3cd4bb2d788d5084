"""LCM-LoRA (Luo et al. 2023b) for Stable Diffusion 1.5: latent consistency distillation as rank-64 / alpha-64 adapters
on the frozen UNet (attention, feed-forward, ResNet and resampler kernels, as diffusers' LCM-LoRA script chooses them),
no w-embedding, the online network as the target; on captioned images (webdataset .tar shards, e.g. a LAION subset).

Commands (the pipeline folder and the shards are yours):
  python -m cm_jax.main --config=configs/sd15_lcm_lora.py --workdir=runs/sd15_lcm_lora \
      --config.latent.pipeline=/path/to/sd15 --config.data.path='/data/laion/{00000..00999}.tar'
  python -m cm_jax.main --config=configs/sd15_lcm_lora.py --workdir=runs/sd15_lcm_lora --mode=export \
      --config.latent.pipeline=/path/to/sd15     # -> runs/sd15_lcm_lora/export/pytorch_lora_weights.safetensors
  (diffusers: pipe.load_lora_weights('runs/sd15_lcm_lora/export'); pipe.scheduler = LCMScheduler.from_config(...);
   4 steps, guidance_scale=1.)
Hardware: 8 GPUs (batch 96 = 12 per device, diffusers' script) or a v5p-8 slice (4 chips: add
--config.train.batch_size=48 for 12 per chip, and on TPU --config.model.attention_kernel=flash); 512 px, bf16
compute, 1000+ steps. Pre-flight (BUILD_NOTES, session 10): v5p:2x2x1, 12 per chip, flash: 14.2 / 95 GiB per chip,
297 ms per step, 162 images/s, 54% MFU as XLA counts it (remat included):
  python -m cm_jax.preflight --config=configs/sd15_lcm_lora.py --topology=v5p:2x2x1 --config.train.batch_size=48 \
      --config.model.attention_kernel=flash --nosampler
Published (LCM-LoRA paper, SD 1.5, LAION-5B-aesthetics): 1-4 step samples without quality tables; the LCM paper's SD 2.1
LCD numbers are in configs/sd21_lcd.py.
Deviation: the reference samples w ~ U[w_min, w_max] for the teacher without showing it to the student; cm_jax
distils one scale (objective.guidance_scale, s = 1 + w = 8) for a student that cannot see w (configs/digits_lcm_lora.py).
"""

import ml_collections

from cm_jax.objectives import objective_config
from configs import sd15_sample

# The kernels diffusers' LCM-LoRA script adapts (its target_modules), as cm_jax parameter paths.
LORA_RULES = (r'/(to_q|to_k|to_v|to_out_0|proj_in|proj_out|net_0/proj|net_2|conv1|conv2|conv_shortcut|'
              r'downsamplers_0/conv|upsamplers_0/conv|time_emb_proj)/kernel$',)


def sd_latent_consistency(resolution: int, lora: bool, prediction: str = 'epsilon'):
  """LCD (lora=False: the whole UNet with LCM's w-embedding, EMA target 0.95, w ~ U[5, 15]) or LCM-LoRA (lora=True)
  of a Stable Diffusion pipeline at `resolution` pixels, with the reference code's settings (reference sheet 7b)."""
  c = sd15_sample.sd_sampling(resolution, prediction)
  c.data = ml_collections.ConfigDict(dict(c.data, name='webdataset', path='', workers=4))  # required: the shards
  c.objective = objective_config(
      name='lcd', skip=20, guidance_scale=(8.0, 8.0) if lora else (6.0, 16.0), target_ema=0.0 if lora else 0.95,
      distance='pseudo_huber_elementwise', distance_c=0.001)
  c.model.guidance_embedding = not lora
  c.model.remat = True  # diffusers' scripts: --gradient_checkpointing
  c.teacher.init = not lora
  if lora:
    c.lora = ml_collections.ConfigDict(dict(c.lora, rank=64, alpha=64.0, rules=LORA_RULES))
  c.ema.rates = (0.0,) if lora else (0.95,)  # sampled: the online adapters / the EMA target
  c.optim = ml_collections.ConfigDict(dict(c.optim, learning_rate=1e-4 if lora else 1e-6, grad_clip=1.0))
  c.train = ml_collections.ConfigDict(dict(c.train, batch_size=96, num_steps=1000, log_every=10))
  c.checkpoint.every_steps = 200
  c.sampling.guidance_scale = 1.0 if lora else 8.5  # LoRA: the scale is in the adapters; LCD: the student's w input
  c.eval.steps = (1, 2, 4, 8)
  return c


def get_config():
  return sd_latent_consistency(512, lora=True)
