"""Text-to-image latent consistency distillation (LCD) on the captioned digits, from digits_t2i_ddpm: the student
starts from the teacher and gets LCM's w input (guidance s ~ U[1, 3] per example, time_cond_proj_dim 64), skipping
step k = 20, EMA target 0.95, l2.

Commands (the teacher first):
  python -m cm_jax.main --config=configs/digits_t2i_ddpm.py --workdir=runs/digits_t2i_ddpm
  python -m cm_jax.main --config=configs/digits_t2i_lcd.py --workdir=runs/digits_t2i_lcd \
      --config.teacher.workdir=runs/digits_t2i_ddpm
Or from a latent cache (--mode=encode once: each record's image, caption and the caption's text states, float16; the
step then runs no text tower; digits_t2i_ddpm and digits_t2i_lcm_lora can read the same cache: same data, pipeline):
  python -m cm_jax.main --config=configs/digits_t2i_lcd.py --workdir=runs/digits_t2i_lcd --mode=encode \
      --config.latent.cache=runs/digits_t2i_cache
  python -m cm_jax.main --config=configs/digits_t2i_lcd.py --workdir=runs/digits_t2i_lcd \
      --config.teacher.workdir=runs/digits_t2i_ddpm --config.latent.cache=runs/digits_t2i_cache
Hardware: 2 CPU cores (BUILD_NOTES.md).
Expected: the digits-proxy table of the teacher (DDIM) and LCD at 1, 2 and 4 LCM steps, at guidance 2.
"""

from cm_jax.objectives import objective_config
from configs import digits_t2i_ddpm


def get_config():
  c = digits_t2i_ddpm.get_config()
  c.teacher.workdir = 'runs/digits_t2i_ddpm'
  c.teacher.init = True
  c.latent.caption_dropout = 0.0
  c.objective = objective_config(
      name='lcd', skip=20, guidance_scale=(1.0, 3.0), target_ema=0.95, distance='l2', distance_c=0.0)
  c.model.guidance_embedding = True
  c.train.num_steps = 3000
  c.optim.learning_rate = 2e-4
  return c
