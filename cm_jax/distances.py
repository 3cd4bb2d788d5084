"""Per-sample distances d(x, y) between batches [B, ...] -> [B] used by the consistency losses."""

import math

import jax.numpy as jnp

from cm_jax import lpips


def _flat(x):
  return jnp.reshape(x, (x.shape[0], -1))


def squared_l2(x, y):
  """d = mean over dimensions of (x - y)^2 (the CM code's 'l2')."""
  return jnp.mean(_flat(x - y) ** 2, axis=-1)


def l1(x, y):
  """d = mean over dimensions of |x - y|."""
  return jnp.mean(jnp.abs(_flat(x - y)), axis=-1)


def l2_norm(x, y):
  """d = ||x - y||_2 over the whole sample (unsquared; ECT)."""
  return jnp.sqrt(jnp.sum(_flat(x - y) ** 2, axis=-1))


def pseudo_huber_c(dim: int) -> float:
  """iCT's constant c = 0.00054 sqrt(D) (0.0299 for CIFAR-10's D = 3072)."""
  return 0.00054 * math.sqrt(dim)


def pseudo_huber(x, y, c=None):
  """d = sqrt(||x - y||^2 + c^2) - c over the WHOLE sample (not per element); c defaults to 0.00054 sqrt(D)."""
  diff = _flat(x - y)
  c = pseudo_huber_c(diff.shape[-1]) if c is None else c
  return jnp.sqrt(jnp.sum(diff**2, axis=-1) + c**2) - c


def cauchy(x, y, c):
  """d = log(1 + ||x - y||^2 / (2 c^2)) (improved latent CT)."""
  return jnp.log1p(jnp.sum(_flat(x - y) ** 2, axis=-1) / (2.0 * c**2))


DISTANCES = {'l2': squared_l2, 'l1': l1, 'l2_norm': l2_norm, 'pseudo_huber': pseudo_huber}


def get_distance(name: str, lpips_weights: str = ''):
  """Looks up a distance by its config name; 'lpips' reads its weights from `lpips_weights` on first use."""
  if name == 'lpips':
    return lpips.lpips_distance(lpips_weights)
  if name not in DISTANCES:
    raise ValueError(f'Unknown distance {name!r}; expected one of {sorted(DISTANCES) + ["lpips"]}.')
  return DISTANCES[name]
