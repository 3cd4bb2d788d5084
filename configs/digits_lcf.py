"""Latent consistency fine-tuning (LCF, Luo et al. 2023) of the digits_lcd model without a teacher: consistency training
on the VP skipping grid, x_hat_{t_n} = alpha_n x0 + sigma_n eps with the eps of x_{t_{n+k}}, EMA target 0.95. The
student's guidance input is fed s = 1 (the one-sample estimate follows the unguided flow of the data).

Commands (digits_lcd first; see configs/digits_lcd.py):
  python -m cm_jax.main --config=configs/digits_lcf.py --workdir=runs/digits_lcf --config.teacher.workdir=runs/digits_lcd
Hardware: 2 CPU cores, minutes (BUILD_NOTES.md).
Expected: the digits-proxy table of the LCD model it starts from and of LCF at 1, 2 and 4 steps, both sampled at s = 1
(BUILD_NOTES.md, "latent family"). On digits the "new data set" is the same digits: the run measures that
teacher-free fine-tuning keeps what distillation reached (see BUILD_NOTES.md for the reading of LCF).
"""

from cm_jax.objectives import objective_config
from configs import digits_lcd


def get_config():
  c = digits_lcd.get_config()
  c.teacher.workdir = 'runs/digits_lcd'
  c.teacher.init = True
  c.objective = objective_config(
      name='lcf', skip=20, guidance_scale=(1.0, 1.0), target_ema=0.95, distance='l2', distance_c=0.0)
  c.sampling.guidance_scale = 1.0
  c.train.num_steps = 2000
  c.optim.learning_rate = 1e-4
  return c
