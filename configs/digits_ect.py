"""Easy consistency tuning (ECT) of the digits_edm teacher on the built-in 8x8 digits.

Commands (the teacher first; ECT starts from its EMA parameters):
  python -m cm_jax.main --config=configs/digits_edm.py --workdir=runs/digits_edm
  python -m cm_jax.main --config=configs/digits_ect.py --workdir=runs/digits_ect --config.teacher.workdir=runs/digits_edm
Hardware: 2 CPU cores, about 4 minutes (BUILD_NOTES.md).
Expected (measured, BUILD_NOTES.md): digits-proxy FD teacher 3.1 at 35 NFE; ECT 22.6 at 1 step, 10.7 at 2 steps.
ECT's CIFAR-10 settings (q = 2, ln t ~ N(-1.1, 2^2), unsquared l2, weighting 1 / (t - r), 2-step sampling at 0.821),
with a stage every 500 of the 4000 iterations instead of every 25k of 400k, and no dropout (the teacher has none:
with dropout 0.1 the proxy FD was worse). Longer stages (1000 or 2000 steps over 8000) and P_mean = 0 did not help
(BUILD_NOTES.md).
"""

import ml_collections

from configs import digits_edm


def get_config():
  c = digits_edm.get_config()
  c.objective = ml_collections.ConfigDict(dict(
      name='ect', p_mean=-1.1, p_std=2.0, q=2.0, stage_steps=500, distance='l2_norm', weighting='inverse_delta'))
  c.teacher.init = True
  c.train.num_steps = 4000
  c.optim.learning_rate = 2e-4
  c.optim.warmup_steps = 0
  c.sampling.mid_sigmas = (0.821,)
  return c
