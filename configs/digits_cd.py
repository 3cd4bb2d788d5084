"""Consistency distillation (CD, CM paper) of the digits_edm teacher on the built-in 8x8 digits.

Commands (the teacher first; CD starts from its EMA parameters and distils it):
  python -m cm_jax.main --config=configs/digits_edm.py --workdir=runs/digits_edm
  python -m cm_jax.main --config=configs/digits_cd.py --workdir=runs/digits_cd --config.teacher.workdir=runs/digits_edm
Hardware: 2 CPU cores, about 4 minutes (BUILD_NOTES.md).
Expected (measured, BUILD_NOTES.md): digits-proxy FD teacher 3.1 at 35 NFE; CD 3.3 at 1 step, 3.0 at 2 steps.
CD settings as in the paper's CIFAR-10 recipe (N = 18, Heun teacher step, mu = 0, initialised from the teacher,
2-step sampling at index 11 of the 18-point grid, ts = [0, 11, 17]) with squared l2 in place of LPIPS.
"""

from cm_jax.objectives import objective_config
from configs import digits_edm


def get_config():
  c = digits_edm.get_config()
  c.objective = objective_config(
      name='cd', num_scales=18, solver='heun', target_ema=0.0, distance='l2')
  c.teacher.init = True
  c.train.num_steps = 4000
  c.optim.learning_rate = 2e-4
  c.optim.warmup_steps = 0
  c.sampling.mid_sigmas = ()
  c.sampling.mid_indices = (11,)
  c.sampling.index_grid_size = 18
  return c
