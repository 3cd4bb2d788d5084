"""Improved MeanFlow (iMF) from scratch on the built-in 8x8 digits: digits_meanflow's network, data and schedule with
iMF's loss on V = u + (t - r) sg(du/dt) and the tangent u(z_t, t, t) (objectives/imeanflow.py).

Command (digits_flow_matching first, for the table's teacher row):
  python -m cm_jax.main --config=configs/digits_imeanflow.py --workdir=runs/digits_imeanflow \
      --config.teacher.workdir=runs/digits_flow_matching
Hardware: 2 CPU cores; a step costs one more network forward than a MeanFlow step (the tangent u(z_t, t, t)); 4000
steps (digits_meanflow's) at 9-18 steps/s beside another run.
Expected (measured, BUILD_NOTES.md, the digits table; seeds 0, 1, 2): digits-proxy FD 4.8, 5.4, 5.2 at 1 NFE and
4.2, 5.1, 4.6 at 2 NFE, against the flow-matching teacher's 4.2, 4.1, 4.8 at 18 NFE (the same run's seed; the mean
ratios 1.19x and 1.08x). The official defaults' logit-normal (-0.4, 1.0) with p = 1 gave 6.1 / 5.0 on seed 0.
Settings: the official iMF code (Lyy-iiis/imeanflow, imf.py iMeanFlow's defaults) for r = t on half of the batch
(flow_share = 0.5; its data_proportion) and c = 0.01 (norm_eps); the times and p are digits_meanflow's (MeanFlow's
CIFAR-10 setting: logit-normal (-2.0, 2.0), p = 0.75), which reach the one-step interval more often. Digits are
unconditional here, so no CFG scale is sampled (objective.cfg_scale_max = 0; the official 7 needs class labels and
model.guidance_embedding=True), and there is no auxiliary v-head (objective.aux_v_head is refused: no cm_jax
network has a second output). Every optional key is listed with its default (imeanflow.OPTIONAL), so the CLI can
set it.
"""

from cm_jax.objectives import objective_config
from configs import digits_meanflow


def get_config():
  c = digits_meanflow.get_config()
  c.objective = objective_config(
      name='imeanflow', p_mean=-2.0, p_std=2.0, flow_share=0.5, norm_p=0.75, norm_c=0.01)
  return c
