"""What minibatch optimal-transport pairing costs per train step (improved latent CT), in one run.

  python benchmarks/coupling_cost.py [--batch_sizes=128,512] [--dims=32,4096] [--rounds=5]

For each batch B and sample size D (32: the digits latents 4x4x2; 4096: Stable Diffusion's 32x32x4 latents), the
median time of one pairing inside a jitted function: 'exact' (scipy's assignment through a host callback, O(B^3))
and 'sinkhorn' (ott-jax, in the compiled program). Then the train step of configs/digits_lct.py (digits latents,
its MLP) at each batch with coupling 'none', 'exact' and 'sinkhorn', timed in interleaved rounds, on the digits
pixels (D = 64: no autoencoder or cache needed; the pairing's cost depends on B and D only). The last line is
`ratios: exact_128=<x.xx> sinkhorn_128=<x.xx> ...`, step time over the step without pairing at the same batch.
"""

import time

from absl import app
from absl import flags
import jax
import numpy as np

from cm_jax import couplings
from cm_jax import experiment
from configs import digits_lct

_BATCHES = flags.DEFINE_list('batch_sizes', ['128', '512'], 'Global batch sizes.')
_DIMS = flags.DEFINE_list('dims', ['32', '4096'], 'Dimensions of one sample for the pairing alone.')
_ROUNDS = flags.DEFINE_integer('rounds', 5, 'Timing rounds (medians are reported).')
_STEPS = flags.DEFINE_integer('steps', 10, 'Train steps per objective per round.')


def _median_ms(fn, *args, repeats=10):
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return 1e3 * float(np.median(times))


def pairing_alone():
  for batch in map(int, _BATCHES.value):
    for dim in map(int, _DIMS.value):
      x, z = (jax.random.normal(jax.random.PRNGKey(i), (batch, dim)) for i in (0, 1))
      exact = jax.jit(couplings.minibatch_ot)
      sinkhorn = jax.jit(lambda a, b: couplings.sinkhorn_coupling(a, b, jax.random.PRNGKey(2)))
      print(f'pairing B={batch} D={dim}: exact {_median_ms(exact, x, z):.1f} ms, '
            f'sinkhorn {_median_ms(sinkhorn, x, z):.1f} ms', flush=True)


class Step:
  """The digits_lct train step at one batch with one coupling, on the digits pixels."""

  def __init__(self, batch: int, coupling: str):
    config = digits_lct.get_config()
    config.latent.update(autoencoder='', cache='', normalization='scaling_factor')
    config.objective.coupling = coupling
    config.train.batch_size = batch
    exp = experiment.Experiment(config)
    self.state, self.step_fn, self.frozen = exp.init_state(), exp.train_step(), exp.frozen()
    with exp.batches(0) as batches:
      self.batch = next(batches)
    self.run(3)

  def run(self, n):
    start = time.perf_counter()
    for _ in range(n):
      self.state, metrics = self.step_fn(self.state, self.batch, self.frozen)
    jax.block_until_ready(metrics)
    return (time.perf_counter() - start) / n


def main(argv):
  del argv
  pairing_alone()
  steps = {(b, c): Step(b, c) for b in map(int, _BATCHES.value) for c in ('none', 'exact', 'sinkhorn')}
  rounds = [{k: s.run(_STEPS.value) for k, s in steps.items()} for _ in range(_ROUNDS.value)]
  ratios = {}
  for (batch, coupling) in steps:
    median = np.median([r[(batch, coupling)] for r in rounds])
    print(f'digits_lct step B={batch} coupling={coupling}: median {1e3 * median:.2f} ms', flush=True)
    if coupling != 'none':
      ratios[f'{coupling}_{batch}'] = np.median([r[(batch, coupling)] / r[(batch, 'none')] for r in rounds])
  print('ratios: ' + ' '.join(f'{k}={v:.2f}' for k, v in ratios.items()))


if __name__ == '__main__':
  app.run(main)
