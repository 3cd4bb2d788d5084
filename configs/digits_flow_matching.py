"""Flow-matching teacher (z_t = (1 - t) x + t e, v-prediction, logit-normal t) on the built-in 8x8 digits: the
teacher row of the MeanFlow digits experiments, on digits_edm's MLP, data, batch and schedule.

Command:
  python -m cm_jax.main --config=configs/digits_flow_matching.py --workdir=runs/digits_flow_matching
Hardware: 2 CPU cores, about 4 minutes (6000 steps, as digits_edm).
Expected: not yet measured here (no quality run yet); a digits-proxy Frechet distance near digits_edm's 3.1 at
its NFE (sampling.teacher_steps = 18 Euler steps; sampling.flow_solver='heun' gives 36 NFE).
Time distribution: logit-normal (P_mean, P_std) = (-0.4, 1.0), MeanFlow's ImageNet setting (SiT / SD3 use (0, 1)).
"""

import ml_collections

from configs import digits_edm


def get_config():
  c = digits_edm.get_config()
  c.parameterization = ml_collections.ConfigDict(dict(name='flow_matching'))
  c.objective = ml_collections.ConfigDict(dict(name='flow_matching', p_mean=-0.4, p_std=1.0))
  return c
