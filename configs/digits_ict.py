"""Improved consistency training (iCT) on the built-in 8x8 digits: the default experiment.

Command (the README's first command trains the digits_edm teacher first, for the table's teacher row):
  python -m cm_jax.main --config=configs/digits_ict.py --workdir=runs/digits_ict \
      --config.teacher.workdir=runs/digits_edm
Hardware: 2 CPU cores, about 6 minutes on an idle machine (8000 steps at ~22 steps/s; BUILD_NOTES.md).
Expected (measured, BUILD_NOTES.md): digits-proxy FD teacher 3.1 at 35 NFE; iCT 38.1 at 1 step, 8.1 at 2 steps.
iCT settings as in the paper (pseudo-Huber, lognormal indices, 1/(sigma_{i+1} - sigma_i), theta- = sg(theta),
doubling curriculum) with s1 = 80 and lr 2e-4 for the short run (s1 = 320, lr 5e-4 gave FD 131 / 21.9).
"""

import ml_collections

from configs import digits_edm


def get_config():
  c = digits_edm.get_config()
  c.objective = ml_collections.ConfigDict(dict(
      name='ict', s0=10, s1=80, p_mean=-1.1, p_std=2.0, distance='pseudo_huber'))
  c.model.dropout = 0.1
  c.train.num_steps = 8000
  c.optim.learning_rate = 2e-4
  c.optim.b2 = 0.995
  c.ema.rates = (0.9993,)
  return c
