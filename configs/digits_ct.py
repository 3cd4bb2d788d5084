"""Consistency training (CT, CM paper) on the built-in 8x8 digits, from a random initialisation.

Command (the README's first command trains the digits_edm teacher first, for the table's teacher row only):
  python -m cm_jax.main --config=configs/digits_ct.py --workdir=runs/digits_ct \
      --config.teacher.workdir=runs/digits_edm
Hardware: 2 CPU cores, about 6 minutes on an idle machine (10k steps at ~30 steps/s; BUILD_NOTES.md).
Expected (measured, BUILD_NOTES.md): digits-proxy FD teacher 3.1 at 35 NFE; CT 6.4 at 1 step, 4.8 at 2 steps.
CT settings as in the paper (N(k) from s0 = 2, mu(k) = exp(s0 ln(mu0) / N(k)) with mu0 = 0.9, lambda = 1, random
initialisation) with squared l2 in place of LPIPS, and for the short run s1 = 40 (not 150) and lr 2e-4: with the
paper's s1 = 150 and lr 5e-4 the 10k-step run collapsed (FD 784 / 158, BUILD_NOTES.md). objective.mu_convention='code'
gives the official code's mu(k) = exp(s0 ln(mu0) / (N(k) - 1)).
"""

from cm_jax.objectives import objective_config
from configs import digits_edm


def get_config():
  c = digits_edm.get_config()
  c.objective = objective_config(
      name='ct', s0=2, s1=40, mu0=0.9, mu_convention='paper', distance='l2')
  c.train.num_steps = 10_000
  c.optim.learning_rate = 2e-4
  return c
