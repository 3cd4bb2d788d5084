"""TrigFlow diffusion teacher (v-prediction, c_noise(t) = t; Lu and Song 2024) on the built-in 8x8 digits: the
teacher of digits_scd.

Command:
  python -m cm_jax.main --config=configs/digits_trigflow.py --workdir=runs/digits_trigflow
  python -m cm_jax.main --config=configs/digits_trigflow.py:cond --workdir=runs/digits_trigflow_cond
(`:cond`: class-conditional on the 10 digit classes with label dropout 0.1, so label -1 is the unconditional
branch that classifier-free guidance needs: the teacher of `configs/digits_scd.py:guided`.)
Hardware: 2 CPU cores, about 4 minutes (6000 steps; BUILD_NOTES.md).
Expected: the digits-proxy Frechet distance at 35 NFE (EDM Heun sampler on the Karras grid, through t = arctan(sigma /
sd)) printed at the end (BUILD_NOTES.md quality table). sCM's network options for stability: positional time
embedding and adaptive double normalisation. The embedding is of 100 t: with 1000 t (the paper configs' value) sCT
on this MLP did not train (||g|| grew to ~100, FD 329 / 279 at 1 / 2 steps; with 100 t, ||g|| ~ 4, FD 4.2 / 5.2).
Time distribution: sCM's CIFAR-10 P_mean = -1.0, P_std = 1.4.
"""

import math

from cm_jax.objectives import objective_config
from configs import digits_edm

VARIANTS = ('', 'cond')


def get_config(arg=''):
  if arg not in VARIANTS:
    raise ValueError(f'Unknown digits_trigflow variant {arg!r}; expected one of {VARIANTS}.')
  c = digits_edm.get_config()
  c.parameterization.name = 'trigflow'
  c.model.time_embedding = 'positional'
  c.model.time_scale = 100.0
  c.model.adaptive_norm = 'double'
  if arg == 'cond':
    c.model.num_classes = 10
    c.model.label_dropout = 0.1
  # adaptive_weighting=True: sCM's learned weighting exp(-w(t)) L_t + w(t) (the paper's teacher has it; off here
  # until measured on digits).
  c.objective = objective_config(name='trigflow', p_mean=-1.0, p_std=1.4, adaptive_weighting=False)
  c.sampling.mid_sigmas = (0.5 * math.tan(1.1),)  # TrigFlow 2-step middle time t = 1.1 (sigma = sd tan t)
  return c
