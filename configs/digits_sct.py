"""Continuous-time consistency training (sCT, Lu and Song 2024) on the built-in 8x8 digits, from scratch.

Command (digits_trigflow first, for the table's teacher row):
  python -m cm_jax.main --config=configs/digits_sct.py --workdir=runs/digits_sct \
      --config.teacher.workdir=runs/digits_trigflow
Hardware: 2 CPU cores, 9.6 minutes (10k steps and the evaluation) on the machine shared with other jobs
(BUILD_NOTES.md).
Expected (measured, BUILD_NOTES.md): digits-proxy FD teacher 3.3 at 35 NFE; sCT 5.7 at 1 step, 4.1 at 2 steps (the
1-step FD of the last checkpoints varies between 4.9 and 6.2: seed noise is large, see quality_digits.py --repeats).
sCT as in the paper: tau ~ N(-1.0, 1.4^2), t = arctan(e^tau / sd), one jax.jvp for the tangent, tangent warm-up
(H scaled to the short run: 1000 of 10k steps, the paper's 10k of 400k+), g / (||g|| + 0.1), adaptive weighting
w_phi(t) with the prior 1/(sd tan t), theta- = sg(theta), dropout. 2-step middle time: the paper's t = 1.1 (sigma =
0.98, digits_trigflow), which the middle-level search (quality_digits.py --mid_candidates, samples of seed 1000)
confirms: 2-step FD 5.55 / 4.89 / 4.52 / 4.49 / 5.62 / 5.42 at sigma 0.25 / 0.5 / 0.98 / 1.5 / 3 / 6.
"""

from cm_jax.objectives import objective_config
from configs import digits_trigflow


def get_config():
  c = digits_trigflow.get_config()
  c.objective = objective_config(
      name='sct', p_mean=-1.0, p_std=1.4, tangent_warmup_steps=1000, tangent_norm='l2', tangent_norm_c=0.1,
      adaptive_weighting=True, prior_weighting=True, jvp='jvp', fd_eps=1e-3)
  c.model.dropout = 0.1
  c.train.num_steps = 10_000
  c.optim.learning_rate = 2e-4
  c.optim.b2 = 0.99
  c.ema.rates = (0.9993,)
  return c
