"""Improved consistency training (iCT) on a 2-D toy distribution (default: an 8-component Gaussian mixture).

Command:
  python -m cm_jax.main --config=configs/toy2d_ict.py:gmm --workdir=runs/toy2d_ict
Hardware: 2 CPU cores, about 1 minute.
Expected: 1-step samples in samples/ concentrate on the mixture's modes (BUILD_NOTES.md).
"""

from cm_jax.objectives import objective_config
from configs import toy2d_edm


def get_config(arg='gmm'):
  c = toy2d_edm.get_config(arg)
  c.objective = objective_config(
      name='ict', s0=10, s1=320, p_mean=-1.1, p_std=2.0, distance='pseudo_huber')
  c.train.num_steps = 4000
  c.optim.b2 = 0.995
  c.ema.rates = (0.999,)
  return c
