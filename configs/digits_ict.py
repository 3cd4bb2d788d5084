"""Improved consistency training (iCT) on the built-in 8x8 digits: the default experiment.

Command (the README's first command trains the digits_edm teacher first, for the table's teacher row):
  python -m cm_jax.main --config=configs/digits_ict.py --workdir=runs/digits_ict \
      --config.teacher.workdir=runs/digits_edm
Hardware: 2 CPU cores, 9.8 minutes (16k steps and the evaluation) on the machine shared with other jobs
(BUILD_NOTES.md).
Expected (measured, BUILD_NOTES.md): digits-proxy FD teacher 3.1 at 35 NFE; iCT 13.5 at 1 step, 3.7 at 2 steps (seeds
0 and 1 with their own teachers: 14.1 +- 0.8 and 4.6 +- 1.2).
iCT settings as in the paper (pseudo-Huber, lognormal indices with P_mean -1.1 and P_std 2.0, 1/(sigma_{i+1} -
sigma_i), theta- = sg(theta), doubling curriculum N(k) = min(s0 2^floor(k/K'), s1) + 1 with K' = K / (log2(s1/s0) + 1)).
The curriculum is scaled to the run by the length of its stages, not by the paper's s1 = 1280: a doubling helps only
once the model has converged at the current N (BUILD_NOTES.md: at 8000 steps, s1 = 10 (no doubling) 37.2 / 12.8,
s1 = 20 (one doubling, K' = 4000) 22.5 / 4.6, s1 = 80 (three doublings, K' = 2000) 38.1 / 8.1); 16k steps with s1 = 20
(K' = 8000, N(K) = 21) fit the 15-minute budget (s1 = 40 there: 15.9 / 9.5). 2-step middle level: sigma = 0.821, the
best of the middle-level search (quality_digits.py --mid_candidates=0.2,0.4,0.6,0.821,1.2,1.5, samples of seed 1000:
2-step FD 27.4 / 9.5 / 6.9 / 5.2 / 13.9 / 7.4).
"""

from cm_jax.objectives import objective_config
from configs import digits_edm


def get_config():
  c = digits_edm.get_config()
  c.objective = objective_config(
      name='ict', s0=10, s1=20, p_mean=-1.1, p_std=2.0, distance='pseudo_huber')
  c.model.dropout = 0.1
  c.train.num_steps = 16_000
  c.optim.learning_rate = 2e-4
  c.optim.b2 = 0.995
  c.ema.rates = (0.9993,)
  c.sampling.mid_sigmas = (0.821,)
  return c
