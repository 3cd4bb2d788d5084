"""Step time and peak memory of each objective against the diffusion (EDM) step on the same network and batch, in one run.

  python benchmarks/step_time.py [--config=configs/digits_ict.py] [--steps=20] [--batch_size=128]

Prints, per objective, the median step time (after warm-up) and the compiled step's peak memory (XLA's memory
analysis: arguments + outputs + temporaries - aliased donations), and as the last line
`ratios: ict=<x.xx> sct=<x.xx> scd=<x.xx> ...` (objective step time / diffusion step time). An iCT step is one
forward and backward plus one forward without gradient (expect about 1.35 or less); sCT adds one forward-mode JVP
instead of the extra forward (goal: <= 1.5). TrigFlow objectives run on parameterization 'trigflow'; distillation
objectives get the initial parameters as their teacher.
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

_SCM = dict(p_mean=-1.0, p_std=1.4, tangent_warmup_steps=10_000, tangent_norm='l2', tangent_norm_c=0.1,
            adaptive_weighting=True, prior_weighting=True, jvp='jvp', fd_eps=1e-3)
OBJECTIVES = {  # name -> (parameterization, objective config, distils a teacher)
    'edm': ('edm', dict(name='edm', p_mean=-1.2, p_std=1.2), False),
    'ict': ('edm', dict(name='ict', s0=10, s1=1280, p_mean=-1.1, p_std=2.0, distance='pseudo_huber'), False),
    'trigflow': ('trigflow', dict(name='trigflow', p_mean=-1.0, p_std=1.4), False),
    'sct': ('trigflow', dict(_SCM, name='sct'), False),
    'scd': ('trigflow', dict(_SCM, name='scd', teacher='trigflow', guidance_scale=(1.0, 1.0)), True),
    'sct_fd': ('trigflow', dict(_SCM, name='sct', jvp='finite_difference'), False),
    'ct_continuous': ('edm', dict(name='ct_continuous', jvp='jvp', fd_eps=1e-3), False),
    'cd_continuous': ('edm', dict(name='cd_continuous', jvp='jvp', fd_eps=1e-3), True),
}


def measure(config, num_steps: int, distill: bool) -> tuple[float, int]:
  """(median wall time of one train step, blocking on each step's output; peak bytes of the compiled step)."""
  exp = train.Experiment(config)
  state, step_fn = exp.init_state(), exp.train_step()
  teacher = jax.tree.map(np.asarray, state.params) if distill else None
  times = []
  with exp.batches(0) as batches:
    batch = next(batches)
    memory = step_fn.lower(state, batch, teacher).compile().memory_analysis()
    peak = (memory.argument_size_in_bytes + memory.output_size_in_bytes + memory.temp_size_in_bytes
            - memory.alias_size_in_bytes)
    for i in range(num_steps + 3):
      start = time.perf_counter()
      state, metrics = step_fn(state, batch, teacher)
      jax.block_until_ready((state, metrics))
      if i >= 3:
        times.append(time.perf_counter() - start)
  return float(np.median(times)), int(peak)


def main(argv):
  del argv
  times = {}
  for name, (parameterization, objective, distill) in OBJECTIVES.items():
    config = ml_collections.ConfigDict(_CONFIG.value.to_dict())
    config.parameterization.name = parameterization
    config.objective = ml_collections.ConfigDict(objective)
    config.train.batch_size = _BATCH.value
    times[name], peak = measure(config, _STEPS.value, distill)
    print(f'{name}: median step {times[name] * 1e3:.2f} ms, peak memory {peak / 2**20:.1f} MiB', flush=True)
  print('ratios: ' + ' '.join(f'{n}={times[n] / times["edm"]:.2f}' for n in times if n != 'edm'))


if __name__ == '__main__':
  app.run(main)
