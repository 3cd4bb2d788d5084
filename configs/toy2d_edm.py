"""EDM diffusion model on a 2-D toy distribution (default: an 8-component Gaussian mixture).

Command:
  python -m cm_jax.main --config=configs/toy2d_edm.py:gmm --workdir=runs/toy2d_edm
  (the argument picks the distribution: gmm, checkerboard or rings)
Hardware: 2 CPU cores, about 1 minute.
Expected: samples/final PNG shows the mixture's modes; the loss settles near 0.2-0.4 (BUILD_NOTES.md).
"""

from configs import base


def get_config(arg='gmm'):
  c = base.get_config()
  c.data.name = arg
  c.data.num_records = 65536
  c.model.hidden = 128
  c.model.depth = 3
  c.objective.name = 'edm'
  c.train.batch_size = 256
  c.train.num_steps = 3000
  c.train.log_every = 500
  c.optim.learning_rate = 1e-3
  c.checkpoint.every_steps = 1000
  c.sampling.num_grid = 2048
  return c
