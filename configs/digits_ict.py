"""Improved consistency training (iCT) on the built-in 8x8 digits: the default experiment.

Command (the README's first command trains the digits_edm teacher first, for the table's teacher row):
  python -m cm_jax.main --config=configs/digits_ict.py --workdir=runs/digits_ict \
      --config.teacher.workdir=runs/digits_edm
Hardware: 2 CPU cores, about 8 minutes (see BUILD_NOTES.md for the measured time).
Expected: a digits-proxy table with the teacher at 35 NFE and iCT at 1 and 2 steps (BUILD_NOTES.md).
iCT settings as in the paper (pseudo-Huber, lognormal indices, 1/(sigma_{i+1} - sigma_i), theta- = sg(theta),
doubling curriculum) with s1 scaled down to the short run.
"""

import ml_collections

from configs import base


def get_config():
  c = base.get_config()
  c.data.name = 'digits'
  c.objective = ml_collections.ConfigDict(dict(
      name='ict', s0=10, s1=320, p_mean=-1.1, p_std=2.0, distance='pseudo_huber'))
  c.model.dropout = 0.1
  c.train.batch_size = 128
  c.train.num_steps = 10_000
  c.train.log_every = 500
  c.optim.learning_rate = 5e-4
  c.optim.b2 = 0.995
  c.optim.warmup_steps = 200
  c.ema.rates = (0.9993,)
  c.checkpoint.every_steps = 2000
  c.sampling.grid_every = 2000
  c.eval.proxy = True
  return c
