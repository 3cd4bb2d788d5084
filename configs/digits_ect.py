"""Easy consistency tuning (ECT) of the digits_edm teacher on the built-in 8x8 digits.

Commands (the teacher first; ECT starts from its EMA parameters):
  python -m cm_jax.main --config=configs/digits_edm.py --workdir=runs/digits_edm
  python -m cm_jax.main --config=configs/digits_ect.py --workdir=runs/digits_ect --config.teacher.workdir=runs/digits_edm
Hardware: 2 CPU cores, about 4 minutes (see BUILD_NOTES.md for the measured time).
Expected: a digits-proxy table with the teacher at 35 NFE and ECT at 1 and 2 steps (BUILD_NOTES.md).
ECT's CIFAR-10 settings (q = 2, ln t ~ N(-1.1, 2^2), unsquared l2, weighting 1 / (t - r), 2-step sampling at 0.821),
with a stage every 500 of the 4000 iterations instead of every 25k of 400k, and no dropout (the teacher has none:
with dropout 0.1 the proxy FD was 24.6 / 17.5 at 1 / 2 steps, without 15.3 / 12.7).
"""

import ml_collections

from configs import base


def get_config():
  c = base.get_config()
  c.data.name = 'digits'
  c.objective = ml_collections.ConfigDict(dict(
      name='ect', p_mean=-1.1, p_std=2.0, q=2.0, stage_steps=500, distance='l2_norm', weighting='inverse_delta'))
  c.teacher.init = True
  c.train.batch_size = 128
  c.train.num_steps = 4000
  c.train.log_every = 500
  c.optim.learning_rate = 2e-4
  c.ema.rates = (0.999,)
  c.checkpoint.every_steps = 2000
  c.sampling.grid_every = 2000
  c.sampling.mid_sigmas = (0.821,)
  c.eval.proxy = True
  return c
