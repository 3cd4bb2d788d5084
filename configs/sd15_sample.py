"""Stable Diffusion 1.5 sampled from prompts: DDIM (trailing grid) with classifier-free guidance, decoded by its VAE.

Command (the pipeline folder is yours: a diffusers StableDiffusionPipeline, e.g. save_pretrained of
stable-diffusion-v1-5; PROMPTS.txt one prompt per line):
  python -m cm_jax.main --config=configs/sd15_sample.py --workdir=runs/sd15_sample --mode=sample \
      --config.latent.pipeline=/path/to/sd15 --config.sampling.prompts=PROMPTS.txt
Hardware (on TPU add --config.model.attention_kernel=flash: 47% MFU against 32%, BUILD_NOTES): one GPU or TPU chip (bf16 compute, float32 weights: 3.4 GB of UNet parameters); 512 px, 50 DDIM steps at
guidance 7.5, 4 prompts a batch.
Gives: WORKDIR/samples/final_50_step.png (the grid) and .npz (all images in [-1, 1]), eval.num_samples images cycling
through the prompts; --config.sampling.negative_prompt='...' sets the unconditional branch.
"""

import ml_collections

from cm_jax.objectives import objective_config
from configs import base


def sd_sampling(resolution: int, prediction: str = 'epsilon'):
  """The sampling config of a Stable Diffusion pipeline at `resolution` pixels (its scheduler: scaled-linear betas
  0.00085 .. 0.012 over 1000 steps, `prediction`)."""
  c = base.get_config()
  c.data = ml_collections.ConfigDict(dict(c.data, name='prompts', image_size=resolution))
  c.latent.pipeline = ''  # required: the diffusers pipeline folder
  c.model = ml_collections.ConfigDict(dict(
      name='sd_unet', unet={}, guidance_embedding=False, guidance_dim=256, dtype='bfloat16', remat=False,
      attention_kernel='xla'))
  c.parameterization = ml_collections.ConfigDict(dict(
      name='vp', num_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule='scaled_linear',
      prediction=prediction, sigma_data=0.5, timestep_scaling=10.0))
  c.objective = objective_config(name='ddpm')
  c.train.batch_size = 4  # the sampling batch
  c.sampling.teacher_steps = 50
  c.sampling.guidance_scale = 7.5
  c.sampling.num_grid = 4
  c.eval.num_samples = 4
  return c


def get_config():
  return sd_sampling(512)
