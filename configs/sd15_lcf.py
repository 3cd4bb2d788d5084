"""Latent consistency fine-tuning (LCF) of an LCM on new captioned data, without a teacher: the one-sample estimate
x_hat = alpha_n x0 + sigma_n eps replaces the teacher's DDIM step (objectives/latent.py), the student's w input fed one
fixed scale, EMA target 0.95. The pipeline is an LCD student (an LCM pipeline folder, e.g. runs/sd21_lcd/export, or
diffusers' SimianLuo/LCM_Dreamshaper_v7 saved locally).

Command:
  python -m cm_jax.main --config=configs/sd15_lcf.py --workdir=runs/sd15_lcf \
      --config.latent.pipeline=/path/to/lcm-pipeline --config.data.name=captioned_folder \
      --config.data.path=/data/my_captioned_images
Hardware: 8 GPUs (batch 96 = 12 per device) or one v5p-8 slice (4 chips: --config.train.batch_size=48 for 12 per
chip), 512 px, bf16, remat; the step is an LCD step without its two teacher forwards. Pre-flight (v5p:2x2x1, flash, 12 per chip, --nosampler;
BUILD_NOTES session 11): 24.93 / 95 GiB per chip, 55.2 TFLOP per chip per step, 243.6 ms estimated, MFU 49%.
Published: the LCM paper shows LCF qualitatively (Pokemon / Simpsons) only.
"""

from cm_jax.objectives import objective_config
from configs import sd15_lcm_lora


def get_config():
  c = sd15_lcm_lora.sd_latent_consistency(512, lora=False)
  c.objective = objective_config(
      name='lcf', skip=20, guidance_scale=(8.5, 8.5), target_ema=0.95, distance='pseudo_huber_elementwise',
      distance_c=0.001)
  c.data.name = 'captioned_folder'
  return c
