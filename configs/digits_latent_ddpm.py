"""Class-conditional DDPM teacher (epsilon prediction, scaled-linear betas over 1000 steps) in the latent space of
digits_autoencoder: the teacher of digits_lcd and the base of digits_lcm_lora, trained with label dropout 0.1 so that
classifier-free guidance works.

Commands (the autoencoder first):
  python -m cm_jax.main --config=configs/digits_autoencoder.py --workdir=runs/digits_autoencoder
  python -m cm_jax.main --config=configs/digits_latent_ddpm.py --workdir=runs/digits_latent_ddpm \
      --config.latent.autoencoder=runs/digits_autoencoder
Hardware: 2 CPU cores, minutes (BUILD_NOTES.md).
Expected: the digits-proxy table of decoded DDIM samples at sampling.teacher_steps with guidance scale
sampling.guidance_scale (BUILD_NOTES.md, "latent family"). Latents are encoded on the fly by the frozen encoder in each
train step (LCM's way) and scaled by the autoencoder's scaling_factor (unit variance).
"""

import ml_collections

from cm_jax.objectives import objective_config
from configs import digits_edm


def get_config():
  c = digits_edm.get_config()
  c.latent.autoencoder = 'runs/digits_autoencoder'
  c.parameterization = ml_collections.ConfigDict(dict(
      name='vp', num_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule='scaled_linear',
      prediction='epsilon', sigma_data=0.5, timestep_scaling=10.0))
  c.objective = objective_config(name='ddpm')
  c.model.time_embedding = 'positional'  # of the integer timestep t (c_noise = t), as DDPM
  c.model.time_scale = 1.0
  c.model.num_classes = 10
  c.model.label_dropout = 0.1
  c.train.num_steps = 8000
  c.optim.learning_rate = 1e-3
  c.sampling.teacher_steps = 50  # DDIM on the trailing 50-step grid (LCM's solver grid, k = 20)
  c.sampling.guidance_scale = 1.5
  c.eval.steps = (1, 2, 4)  # a consistency student's; the teacher row uses teacher_steps
  return c
