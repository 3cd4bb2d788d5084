"""Flow-matching teacher on the built-in 8x8 digits with a small DiT (models/dit.py: 2x2 patches, 16 tokens) in place
of digits_flow_matching's MLP: the DiT rows of the MeanFlow digits experiments (digits_dit_meanflow).

Command:
  python -m cm_jax.main --config=configs/digits_dit_flow_matching.py --workdir=runs/digits_dit_flow_matching
Hardware: 2 CPU cores; the full 6000 steps not yet run (BUILD_NOTES.md).
Expected: not yet measured (the MLP teacher's digits-proxy FD is the bar).
Network: depth 4, hidden 64, 4 heads (0.33M parameters), t embedded by DiT's timestep MLP of t itself
(time_scale 1, as SiT and the official MeanFlow code: the JVP along t of a 1000 t embedding is 1000x steeper).
"""

import ml_collections

from configs import digits_flow_matching

DIGITS_DIT = dict(name='dit', size='', depth=4, hidden=64, heads=4, patch_size=2, num_classes=0, label_dropout=0.0,
                  time_embedding='positional', time_scale=1.0, second_time=False, dtype='float32', remat='',
                  attention_kernel='xla')


def get_config():
  c = digits_flow_matching.get_config()
  c.model = ml_collections.ConfigDict(DIGITS_DIT)
  return c
