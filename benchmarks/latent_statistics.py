"""Why improved latent CT's changes do not help on the digits latents: their outliers and how strongly minibatch OT
pairs them, against Stable Diffusion's latent size.

  python benchmarks/latent_statistics.py --cache=runs/quality_lct/latents [--batch_size=128] [--trials=5]

Prints the per-element kurtosis of the standardised cached latents (a Gaussian's is 3; impulsive outliers make it
large), the share of |z| > 4 (a Gaussian's is 6.3e-5), and for D = the cache's size and D = 4096 (32x32x4) the cost of
the optimal pairing of a batch (latents at std 0.5, or Gaussian data of std 0.5 at D = 4096) with unit noise, over
the cost of the independent pairing (1: OT changes nothing).
"""

from absl import app
from absl import flags
import jax.numpy as jnp
import numpy as np

from cm_jax import couplings
from cm_jax import latents

_CACHE = flags.DEFINE_string('cache', 'runs/quality_lct/latents', 'A latent cache written by --mode=encode.')
_BATCH = flags.DEFINE_integer('batch_size', 128, 'Batch paired by OT.')
_TRIALS = flags.DEFINE_integer('trials', 5, 'Batches averaged.')


def ot_cost_ratio(data_batches, rng) -> float:
  """Mean over batches of sum ||x_i - z_pi(i)||^2 / sum ||x_i - z_i||^2 with z ~ N(0, I)."""
  ratios = []
  for x in data_batches:
    z = rng.standard_normal(x.shape).astype(np.float32)
    paired = np.asarray(couplings.minibatch_ot(jnp.asarray(x), jnp.asarray(z)))
    ratios.append(((x - paired) ** 2).sum() / ((x - z) ** 2).sum())
  return float(np.mean(ratios))


def main(argv):
  del argv
  cache = latents.LatentCacheSource(_CACHE.value)
  x = cache.get(np.arange(len(cache)))['image'].reshape(len(cache), -1)
  z = (x - x.mean(0)) / x.std(0)
  kurtosis = (z**4).mean(0)
  print(f'{len(cache)} latents of {x.shape[1]} elements: per-element kurtosis median {np.median(kurtosis):.2f}, '
        f'max {kurtosis.max():.2f}; share |z| > 4: {(np.abs(z) > 4).mean():.2e}')
  rng = np.random.default_rng(0)
  own = [(0.5 * z[rng.choice(len(z), _BATCH.value)]).astype(np.float32) for _ in range(_TRIALS.value)]
  gaussian = [(0.5 * rng.standard_normal((_BATCH.value, 4096))).astype(np.float32) for _ in range(_TRIALS.value)]
  print(f'OT cost / independent cost at batch {_BATCH.value}: D = {x.shape[1]} {ot_cost_ratio(own, rng):.3f}, '
        f'D = 4096 {ot_cost_ratio(gaussian, rng):.3f}')


if __name__ == '__main__':
  app.run(main)
