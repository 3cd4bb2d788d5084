"""Text-to-image DDPM teacher on the captioned digits: the built-in pixel pipeline (latent.pipeline='digits': a small
UNet2DConditionModel with cross-attention on the states of a frozen random-weight CLIP text tower, cm_jax/
digits_pipeline.py) trained from scratch on the 8x8 digits with captions such as "a handwritten seven", caption
dropout 0.1 (the empty prompt is the unconditional branch of guidance). The teacher of digits_t2i_lcd and the base of
digits_t2i_lcm_lora.

Command:
  python -m cm_jax.main --config=configs/digits_t2i_ddpm.py --workdir=runs/digits_t2i_ddpm
Hardware: 2 CPU cores (BUILD_NOTES.md).
Expected: the digits-proxy table of DDIM samples (sampling.teacher_steps, guidance sampling.guidance_scale) drawn for
the data's captions.
"""

import ml_collections

from cm_jax.objectives import objective_config
from configs import base


def get_config():
  c = base.get_config()
  c.data = ml_collections.ConfigDict(dict(c.data, name='captioned_digits'))
  c.latent.pipeline = 'digits'
  c.latent.caption_dropout = 0.1
  c.model = ml_collections.ConfigDict(dict(
      name='sd_unet', unet={}, guidance_embedding=False, guidance_dim=64, dtype='float32', remat=False,
      attention_kernel='xla'))
  c.parameterization = ml_collections.ConfigDict(dict(
      name='vp', num_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule='scaled_linear',
      prediction='epsilon', sigma_data=0.5, timestep_scaling=10.0))
  c.objective = objective_config(name='ddpm')
  c.train.batch_size = 64
  c.train.num_steps = 6000
  c.optim.learning_rate = 1e-3
  c.optim.grad_clip = 1.0
  c.sampling.teacher_steps = 50
  c.sampling.guidance_scale = 2.0
  c.eval.steps = (1, 2, 4)
  c.eval.proxy = True
  return c
