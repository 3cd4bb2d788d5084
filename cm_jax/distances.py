"""Per-sample distances d(x, y, c) between batches [B, ...] -> [B] used by the consistency losses.

Every distance takes a scale c (None: its default); the ones without a scale ignore it. The robust ones, for the
comparison of improved latent CT (Dao et al. 2025), with D the dimensions of one sample and r^2 = mean_D (x - y)^2:
  pseudo_huber    sqrt(||x - y||^2 + c^2) - c over the WHOLE sample (iCT), c = 0.00054 sqrt(D)
  pseudo_huber_elementwise  mean_D(sqrt((x - y)^2 + c^2) - c), c = 0.001 (LCM's 'huber')
  cauchy          log(1 + r^2 / (2 c^2)), c = 0.00054 sqrt(D) (the reference code's mean over dimensions)
  geman_mcclure   2 (r^2 / c^2) / (r^2 / c^2 + 4), c = 0.00054 sqrt(D)
"""

import math

import flax
import jax
import jax.numpy as jnp

from cm_jax import lpips


def _flat(x):
  return jnp.reshape(x, (x.shape[0], -1))


def _mean_square(x, y):
  return jnp.mean(_flat(x - y) ** 2, axis=-1)


def pseudo_huber_c(dim: int) -> float:
  """iCT's constant c = 0.00054 sqrt(D) (0.0299 for CIFAR-10's D = 3072)."""
  return 0.00054 * math.sqrt(dim)


def squared_l2(x, y, c=None):
  """d = mean over dimensions of (x - y)^2 (the CM code's 'l2')."""
  del c
  return _mean_square(x, y)


def l1(x, y, c=None):
  """d = mean over dimensions of |x - y|."""
  del c
  return jnp.mean(jnp.abs(_flat(x - y)), axis=-1)


def l2_norm(x, y, c=None):
  """d = ||x - y||_2 over the whole sample (unsquared; ECT)."""
  del c
  return jnp.sqrt(jnp.sum(_flat(x - y) ** 2, axis=-1))


def pseudo_huber(x, y, c=None):
  """d = sqrt(||x - y||^2 + c^2) - c over the WHOLE sample (not per element); c defaults to 0.00054 sqrt(D)."""
  diff = _flat(x - y)
  c = pseudo_huber_c(diff.shape[-1]) if c is None else c
  return jnp.sqrt(jnp.sum(diff**2, axis=-1) + c**2) - c


def pseudo_huber_elementwise(x, y, c=None):
  """d = mean over dimensions of sqrt((x - y)^2 + c^2) - c; c defaults to 0.001 (LCM's Huber loss)."""
  c = 0.001 if c is None else c
  return jnp.mean(jnp.sqrt(_flat(x - y) ** 2 + c**2) - c, axis=-1)


def cauchy(x, y, c=None):
  """d = log(1 + mean_D (x - y)^2 / (2 c^2)) (improved latent CT); c defaults to 0.00054 sqrt(D)."""
  c = pseudo_huber_c(_flat(x).shape[-1]) if c is None else c
  return jnp.log1p(_mean_square(x, y) / (2.0 * c**2))


def geman_mcclure(x, y, c=None):
  """d = 2 u / (u + 4), u = mean_D (x - y)^2 / c^2 (Barron's alpha = -2); c defaults to 0.00054 sqrt(D)."""
  c = pseudo_huber_c(_flat(x).shape[-1]) if c is None else c
  u = _mean_square(x, y) / c**2
  return 2.0 * u / (u + 4.0)


DISTANCES = {'l2': squared_l2, 'l1': l1, 'l2_norm': l2_norm, 'pseudo_huber': pseudo_huber,
             'pseudo_huber_elementwise': pseudo_huber_elementwise, 'cauchy': cauchy, 'geman_mcclure': geman_mcclure}
SCALED = ('pseudo_huber', 'pseudo_huber_elementwise', 'cauchy', 'geman_mcclure')  # the distances c acts on


def get_distance(name: str):
  """d(x, y, c=None, inputs=None) -> [B] by config name; 'lpips' reads its network from inputs['lpips']."""
  if name == 'lpips':
    distance = lpips.lpips_distance()
    return lambda x, y, c=None, inputs=None: distance(x, y, inputs['lpips'])
  if name not in DISTANCES:
    raise ValueError(f'Unknown distance {name!r}; expected one of {sorted(DISTANCES) + ["lpips"]}.')
  return lambda x, y, c=None, inputs=None: DISTANCES[name](x, y, c)


def step_inputs(name: str, lpips_weights: str = ''):
  """load(abstract=False) -> what the distance reads from the train step's inputs: {'lpips': weights} for 'lpips'
  (read from `lpips_weights` when the trainer loads it, before compiling; shapes only when abstract), else {}."""
  def load(abstract=False):
    if name != 'lpips':
      return {}
    if abstract:
      shapes = {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in lpips.expected_shapes().items()}
      return {'lpips': flax.traverse_util.unflatten_dict(shapes, sep='/')}
    return {'lpips': lpips.load_params(lpips_weights)}
  return load
