"""EDM diffusion teacher on the built-in 8x8 digits (scikit-learn), the teacher of the digits experiments, whose
data, batch, logging, checkpoint and evaluation settings every other digits config starts from.

Command:
  python -m cm_jax.main --config=configs/digits_edm.py --workdir=runs/digits_edm
Hardware: 2 CPU cores, about 4 minutes on an idle machine (6000 steps at ~30 steps/s; BUILD_NOTES.md).
Expected (measured, BUILD_NOTES.md): digits-proxy Frechet distance 3.1 at 35 NFE.
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
