"""MeanFlow (Geng et al. 2025) from scratch on the built-in 8x8 digits: the average velocity u(z_t, r, t) with one
jax.jvp per step, sampled in 1 and 2 NFE, on digits_flow_matching's MLP with the second time input
(model.second_time: t - r embedded beside t).

Command (digits_flow_matching first, for the table's teacher row):
  python -m cm_jax.main --config=configs/digits_meanflow.py --workdir=runs/digits_meanflow \
      --config.teacher.workdir=runs/digits_flow_matching
Hardware: 2 CPU cores shared with other jobs: 4000 steps at 20-45 steps/s, 2-4 minutes.
Expected (measured, BUILD_NOTES.md "Flow matching and MeanFlow", the digits table; seeds 0, 1, 2): digits-proxy FD
4.1, 5.0, 4.1 at 1 NFE and 3.4, 4.1, 3.8 at 2 NFE, against the flow-matching teacher's 4.2, 4.1, 4.8 at 18 NFE (the
same run's seed; the mean ratios 1.02x and 0.87x).
Settings: the paper's CIFAR-10 setting: logit-normal (-2.0, 2.0) for both times, p = 0.75, r != t for 75% of the
batch (flow_share = 0.25); c = 0.01 (the official code's norm_eps; the paper's text says 1e-3). The paper's
ImageNet setting (-0.4, 1.0), p = 1 gave 1-NFE FD 9.1 on seed 0 (2.2x the teacher): its times rarely reach the
one-step interval r = 0, t = 1 that 1-NFE sampling uses. The time embedding is digits_flow_matching's
low-frequency one (du/dt differentiates it). Every optional key is listed with its default (meanflow.OPTIONAL:
CFG off), so the CLI can set it.
"""

from cm_jax.objectives import objective_config
from configs import digits_flow_matching


def get_config():
  c = digits_flow_matching.get_config()
  c.objective = objective_config(
      name='meanflow', p_mean=-2.0, p_std=2.0, flow_share=0.25, norm_p=0.75, norm_c=0.01)
  c.model.second_time = True
  c.train.num_steps = 4000
  return c
