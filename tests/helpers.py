"""Tiny configs for trainer tests: a 2-D Gaussian mixture and an MLP, seconds per run on a CPU."""

import ml_collections

from configs import toy2d_ict


def tiny_config(objective='ict', num_steps=12, batch_size=16):
  c = toy2d_ict.get_config('gmm')
  c.data.num_records = 512
  c.model.hidden, c.model.depth = 32, 1
  if objective == 'edm':
    c.objective = ml_collections.ConfigDict(dict(name='edm', p_mean=-1.2, p_std=1.2))
  c.train.num_steps, c.train.batch_size, c.train.log_every = num_steps, batch_size, 4
  c.checkpoint.every_steps, c.checkpoint.async_save = num_steps // 2, True
  c.optim.warmup_steps = 3
  c.optim.grad_clip = 1.0
  c.ema.rates = (0.9, 0.5)
  c.sampling.num_grid = 16
  c.eval.num_samples = 16
  return c
