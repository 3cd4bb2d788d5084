"""MeanFlow (Geng et al. 2025) from scratch on the built-in 8x8 digits: the average velocity u(z_t, r, t) with one
jax.jvp per step, sampled in 1 and 2 NFE, on digits_edm's MLP with the second time input (model.second_time).

Command (digits_flow_matching first, for the table's teacher row):
  python -m cm_jax.main --config=configs/digits_meanflow.py --workdir=runs/digits_meanflow \
      --config.teacher.workdir=runs/digits_flow_matching
Hardware: 2 CPU cores; a MeanFlow step is one forward, one JVP and one backward (about 1.5-2x a flow-matching step
here, not yet measured); 10k steps should fit in about 10 minutes.
Expected: not yet measured (the issue's aim: 1-NFE FD within 2x and 2-NFE within 1.3x of the flow-matching teacher).
Settings: the paper's ImageNet defaults (its Table 4 / appendix): logit-normal (-0.4, 1.0) for both times, r != t
for 25% of the batch (flow_share = 0.75), adaptive weight p = 1 with c = 1e-3 (the paper's text). Its CIFAR-10
setting differs: (-2.0, 2.0), r != t for 75%, p = 0.75.
"""

import ml_collections

from configs import digits_flow_matching


def get_config():
  c = digits_flow_matching.get_config()
  c.objective = ml_collections.ConfigDict(dict(
      name='meanflow', p_mean=-0.4, p_std=1.0, flow_share=0.75, norm_p=1.0, norm_c=1e-3))
  c.model.second_time = True
  c.train.num_steps = 10_000
  return c
