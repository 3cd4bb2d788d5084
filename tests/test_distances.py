"""Distances: closed-form values, zero on equal inputs, and pseudo-Huber over the whole sample."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cm_jax import distances


def test_closed_form_values():
  x = jnp.zeros((2, 2, 2))
  y = jnp.stack([jnp.full((2, 2), 1.0), jnp.full((2, 2), 2.0)])
  np.testing.assert_allclose(distances.squared_l2(x, y), [1.0, 4.0])
  np.testing.assert_allclose(distances.l1(x, y), [1.0, 2.0])
  np.testing.assert_allclose(distances.l2_norm(x, y), [2.0, 4.0])
  c = distances.pseudo_huber_c(4)
  np.testing.assert_allclose(c, 0.00108)
  np.testing.assert_allclose(distances.pseudo_huber(x, y), np.sqrt([4.0 + c**2, 16.0 + c**2]) - c, rtol=1e-6)
  np.testing.assert_allclose(distances.cauchy(x, y, 0.5), np.log1p(np.array([4.0, 16.0]) / 0.5))


def test_pseudo_huber_constant_for_cifar10():
  np.testing.assert_allclose(distances.pseudo_huber_c(3 * 32 * 32), 0.0299, atol=1e-4)


def test_pseudo_huber_is_over_the_whole_sample_not_per_element():
  # Per element, sum_j (sqrt(d_j^2 + c^2) - c) = 2 for d = (1, 1); over the sample it is sqrt(2 + c^2) - c.
  x, y = jnp.zeros((1, 2)), jnp.ones((1, 2))
  np.testing.assert_allclose(distances.pseudo_huber(x, y, c=0.0), [np.sqrt(2.0)], rtol=1e-6)


@pytest.mark.parametrize('name', sorted(distances.DISTANCES))
def test_zero_on_equal_inputs_positive_otherwise(name):
  d = distances.get_distance(name)
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 3, 3))
  np.testing.assert_allclose(d(x, x), 0.0, atol=1e-7)
  assert np.all(d(x, x + 0.1) > 0)
  np.testing.assert_allclose(d(x, x + 0.1), d(x + 0.1, x), rtol=1e-6)


def test_unknown_distance():
  with pytest.raises(ValueError, match='cosine'):
    distances.get_distance('cosine')
