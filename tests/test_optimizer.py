"""The optimiser really applies warm-up and gradient clipping."""

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from cm_jax.state import make_optimizer


def _config(**kw):
  c = dict(name='adam', learning_rate=0.1, b1=0.9, b2=0.999, eps=1.0, warmup_steps=0, grad_clip=0.0)
  c.update(kw)
  return ml_collections.ConfigDict(c)


def _first_update(tx, grad):
  params = {'w': jnp.zeros(3)}
  updates, _ = tx.update({'w': grad}, tx.init(params), params)
  return np.asarray(updates['w'])


def test_clipping_bounds_the_gradient_norm():
  # With eps = 1 Adam's first update m / (sqrt(v) + eps) depends on the gradient's scale, so clipping shows.
  g = jnp.array([3.0, 4.0, 0.0])  # norm 5
  clipped = make_optimizer(_config(grad_clip=1.0))
  np.testing.assert_allclose(_first_update(clipped, 10 * g), _first_update(clipped, g / 5), rtol=1e-6)
  unclipped = make_optimizer(_config())
  assert not np.allclose(_first_update(unclipped, 10 * g), _first_update(unclipped, g / 5))


@pytest.mark.parametrize('name', ['adam', 'radam'])
def test_warmup_starts_at_zero_and_reaches_the_rate(name):
  tx = make_optimizer(_config(name=name, warmup_steps=4, eps=1e-8))
  params = {'w': jnp.zeros(3)}
  state = tx.init(params)
  sizes = []
  for _ in range(6):
    updates, state = tx.update({'w': jnp.ones(3)}, state, params)
    sizes.append(float(jnp.abs(updates['w']).max()))
  # A constant gradient's Adam update is lr(k) * 1, the schedule itself; RAdam's first steps (no variance
  # rectification yet) are lr(k) * 1 too.
  np.testing.assert_allclose(sizes[:5], [0.0, 0.025, 0.05, 0.075, 0.1], rtol=1e-4)
  if name == 'adam':
    np.testing.assert_allclose(sizes[5], 0.1, rtol=1e-4)


def test_unknown_optimizer():
  with pytest.raises(ValueError, match='sgd'):
    make_optimizer(_config(name='sgd'))
