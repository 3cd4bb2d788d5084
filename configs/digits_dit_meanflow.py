"""MeanFlow from scratch on the built-in 8x8 digits with digits_dit_flow_matching's DiT and its second time input
(model.second_time: t - r embedded beside t, as MeanFlow's DiT): digits_meanflow's objective on the DiT.

Command (digits_dit_flow_matching first, for the table's teacher row):
  python -m cm_jax.main --config=configs/digits_dit_meanflow.py --workdir=runs/digits_dit_meanflow \
      --config.teacher.workdir=runs/digits_dit_flow_matching
Hardware: 2 CPU cores; not yet measured.
Expected: not yet measured (the issue's aim: 1-NFE FD within 2x and 2-NFE within 1.3x of the flow-matching teacher).
"""

import ml_collections

from configs import digits_dit_flow_matching
from configs import digits_meanflow


def get_config():
  c = digits_meanflow.get_config()
  c.model = ml_collections.ConfigDict(dict(digits_dit_flow_matching.DIGITS_DIT, second_time=True))
  return c
