"""Continuous-time consistency training (sCT, Lu and Song 2024) on the built-in 8x8 digits, from scratch.

Command:
  python -m cm_jax.main --config=configs/digits_sct.py --workdir=runs/digits_sct
Hardware: 2 CPU cores, minutes (not yet measured; BUILD_NOTES.md).
Expected: a digits-proxy table at 1 and 2 steps (2-step middle time t = 1.1); not yet measured.
sCT as in the paper: tau ~ N(-1.0, 1.4^2), t = arctan(e^tau / sd), one jax.jvp for the tangent, tangent warm-up
(H scaled to the short run: 1000 of 10k steps, the paper's 10k of 400k+), g / (||g|| + 0.1), adaptive weighting
w_phi(t) with the prior 1/(sd tan t), theta- = sg(theta), dropout.
"""

import ml_collections

from configs import digits_trigflow


def get_config():
  c = digits_trigflow.get_config()
  c.objective = ml_collections.ConfigDict(dict(
      name='sct', p_mean=-1.0, p_std=1.4, tangent_warmup_steps=1000, tangent_norm='l2', tangent_norm_c=0.1,
      adaptive_weighting=True, prior_weighting=True, jvp='jvp', fd_eps=1e-3))
  c.model.dropout = 0.1
  c.train.num_steps = 10_000
  c.optim.learning_rate = 2e-4
  c.optim.b2 = 0.99
  c.ema.rates = (0.9993,)
  return c
