"""EDM diffusion teacher on the built-in 8x8 digits (scikit-learn), the teacher of the digits experiments.

Command:
  python -m cm_jax.main --config=configs/digits_edm.py --workdir=runs/digits_edm
Hardware: 2 CPU cores, about 4 minutes (see BUILD_NOTES.md for the measured time).
Expected: the digits-proxy Frechet distance at 35 NFE printed at the end (BUILD_NOTES.md has the measured table).
"""

from configs import base


def get_config():
  c = base.get_config()
  c.data.name = 'digits'
  c.objective.name = 'edm'
  c.train.batch_size = 128
  c.train.num_steps = 6000
  c.train.log_every = 500
  c.optim.learning_rate = 1e-3
  c.optim.warmup_steps = 200
  c.ema.rates = (0.999,)
  c.checkpoint.every_steps = 2000
  c.sampling.grid_every = 2000
  c.eval.proxy = True
  return c
