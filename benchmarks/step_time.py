"""Step time of each objective against the diffusion (EDM) step on the same network and batch, in one run.

  python benchmarks/step_time.py [--config=configs/digits_ict.py] [--steps=20] [--batch_size=128]

Prints the median step time of each objective (after warm-up) and, as the last line,
`ratios: ict=<x.xx>` (objective step time / diffusion step time). An iCT step is one forward and backward
plus one forward without gradient, so expect about 1.35 or less.
"""

import time

from absl import app
from absl import flags
import jax
import ml_collections
import numpy as np
from ml_collections import config_flags

from cm_jax import train

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/digits_ict.py', 'Network, data and batch to time.')
_STEPS = flags.DEFINE_integer('steps', 20, 'Timed steps per objective (after 3 warm-up steps).')
_BATCH = flags.DEFINE_integer('batch_size', 128, 'Global batch size.')

OBJECTIVES = {
    'edm': dict(name='edm', p_mean=-1.2, p_std=1.2),
    'ict': dict(name='ict', s0=10, s1=1280, p_mean=-1.1, p_std=2.0, distance='pseudo_huber'),
}


def median_step_time(config, num_steps: int) -> float:
  """Median wall time of one train step, blocking on each step's output."""
  exp = train.Experiment(config)
  state, step_fn = exp.init_state(), exp.train_step()
  times = []
  with exp.batches(0) as batches:
    batch = next(batches)
    for i in range(num_steps + 3):
      start = time.perf_counter()
      state, metrics = step_fn(state, batch, None)
      jax.block_until_ready((state, metrics))
      if i >= 3:
        times.append(time.perf_counter() - start)
  return float(np.median(times))


def main(argv):
  del argv
  times = {}
  for name, objective in OBJECTIVES.items():
    config = ml_collections.ConfigDict(_CONFIG.value.to_dict())
    config.objective = ml_collections.ConfigDict(objective)
    config.train.batch_size = _BATCH.value
    times[name] = median_step_time(config, _STEPS.value)
    print(f'{name}: median step {times[name] * 1e3:.2f} ms', flush=True)
  print('ratios: ' + ' '.join(f'{n}={times[n] / times["edm"]:.2f}' for n in times if n != 'edm'))


if __name__ == '__main__':
  app.run(main)
