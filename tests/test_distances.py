"""Distances: closed-form values, zero on equal inputs, pseudo-Huber over the whole sample, and the robust losses of
improved latent CT (Cauchy with a mean over dimensions, Geman-McClure, LCM's element-wise pseudo-Huber)."""

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
  # r^2 = mean_D (x - y)^2 = (1, 4); Cauchy log(1 + r^2 / (2 c^2)) with c = 0.5: log(1 + 2 r^2) = (log 3, log 9).
  np.testing.assert_allclose(distances.cauchy(x, y, 0.5), [np.log(3.0), np.log(9.0)], rtol=1e-6)
  # Geman-McClure 2 u / (u + 4), u = r^2 / c^2 = (4, 16): (1, 1.6).
  np.testing.assert_allclose(distances.geman_mcclure(x, y, 0.5), [1.0, 1.6], rtol=1e-6)
  # Element-wise pseudo-Huber mean(sqrt(d^2 + c^2) - c) with c = 0.75: (1.25 - 0.75, 2.136... - 0.75).
  np.testing.assert_allclose(distances.pseudo_huber_elementwise(x, y, 0.75), [0.5, np.sqrt(4.5625) - 0.75], rtol=1e-6)


def test_robust_distances_default_scales():
  """Cauchy and Geman-McClure default to c = 0.00054 sqrt(D) (D = 16 here: c = 0.00216), LCM's Huber to 0.001."""
  x, y = jnp.zeros((1, 4, 4)), jnp.full((1, 4, 4), 0.01)
  c = 0.00054 * 4
  np.testing.assert_allclose(distances.cauchy(x, y), [np.log1p(1e-4 / (2 * c**2))], rtol=1e-5)
  np.testing.assert_allclose(distances.geman_mcclure(x, y), [2 * (1e-4 / c**2) / (1e-4 / c**2 + 4)], rtol=1e-5)
  np.testing.assert_allclose(distances.pseudo_huber_elementwise(x, y), [np.sqrt(1e-4 + 1e-6) - 1e-3], rtol=1e-4)


def test_cauchy_is_a_mean_over_dimensions_and_bounded_in_its_gradient():
  """Doubling the sample with the same per-element differences leaves the Cauchy distance unchanged (a mean, not a
  sum), and its gradient in r^2 is 1 / (2 c^2 + r^2): an outlier of 100x the error gets < 1% of l2's weight."""
  small, big = jnp.zeros((1, 8)), jnp.zeros((1, 16))
  np.testing.assert_allclose(distances.cauchy(small, small + 0.3, 0.1), distances.cauchy(big, big + 0.3, 0.1),
                             rtol=1e-6)
  grad = lambda d: jax.grad(lambda y: distances.cauchy(jnp.zeros((1, 1)), y, 0.1)[0])(jnp.full((1, 1), d))[0, 0]
  np.testing.assert_allclose(grad(0.1), 2 * 0.1 / (2 * 0.01 + 0.01), rtol=1e-5)
  assert grad(10.0) / (2 * 10.0) < 0.01 * grad(0.1) / (2 * 0.1)


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
  np.testing.assert_allclose(d(x, x), 0.0, atol=1e-6)
  assert np.all(d(x, x + 0.1) > 0)
  np.testing.assert_allclose(d(x, x + 0.1), d(x + 0.1, x), rtol=1e-6)


def test_unknown_distance():
  with pytest.raises(ValueError, match='cosine'):
    distances.get_distance('cosine')
