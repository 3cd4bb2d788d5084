"""The Gaussian oracle (reference section 1): with data x0 ~ N(0, sd^2 I) everything is known in closed form.

  D*(x, sigma) = sd^2 / (sigma^2 + sd^2) x,     x(s) = x(sigma) sqrt(s^2 + sd^2) / sqrt(sigma^2 + sd^2),
  f*(x, sigma) = x sqrt(eps^2 + sd^2) / sqrt(sigma^2 + sd^2).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from cm_jax import schedules
from cm_jax import solvers
from cm_jax.objectives import objective_config
from cm_jax.objectives.discrete import make_ict
from cm_jax.parameterization import TrigFlow
from oracle import EDM_, EPS, SD, T, OracleNet, exact_consistency, exact_denoiser


class RandomNet(nn.Module):
  @nn.compact
  def __call__(self, x_in, c_noise, cond=None, train=False):
    return nn.Dense(x_in.shape[-1])(jnp.concatenate([x_in, c_noise[:, None]], -1)) * 10.0


def test_boundary_condition_holds_for_any_network():
  x = jax.random.normal(jax.random.PRNGKey(0), (16, 5)) * 3.0
  model = RandomNet()
  params = model.init(jax.random.PRNGKey(1), x, jnp.zeros(16))
  net = lambda xi, c: model.apply(params, xi, c)
  out = EDM_.consistency(net, x, jnp.full((16,), EPS))
  np.testing.assert_array_equal(out, x)
  assert not np.allclose(EDM_.consistency(net, x, jnp.full((16,), 1.0)), x)
  tf = TrigFlow(sigma_data=SD)
  np.testing.assert_array_equal(tf.consistency(net, x, jnp.zeros(16)), x)


def test_oracle_net_reproduces_exact_consistency_function():
  x = jax.random.normal(jax.random.PRNGKey(0), (8, 3))
  sigma = jnp.geomspace(0.01, 80.0, 8)
  model = OracleNet()
  params = model.init(jax.random.PRNGKey(0), x, jnp.zeros(8))
  f = EDM_.consistency(lambda xi, c: model.apply(params, xi, c), x, sigma)
  np.testing.assert_allclose(f, exact_consistency(x, sigma), rtol=1e-4)


def test_heun_sampler_matches_closed_form_ode_solution():
  """EDM's Heun sampler is second order: on the oracle its error at eps is 5.5% with 18 grid points, and each
  doubling of the grid divides it by ~4, reaching 1e-3 at 144 points (BUILD_NOTES.md: the 1e-3-at-18-steps
  target is not attainable by any 18-step Heun solver on this ODE)."""
  x_T = T * jax.random.normal(jax.random.PRNGKey(0), (64, 6))
  exact_eps = x_T * np.sqrt(EPS**2 + SD**2) / np.sqrt(T**2 + SD**2)
  errors = []
  for n in (18, 36, 72, 144):
    x_eps = solvers.heun_solve(exact_denoiser, x_T, schedules.karras_sigmas(n, EPS, T)[::-1])
    errors.append(float(jnp.max(jnp.abs(x_eps / exact_eps - 1.0))))
  assert errors[0] < 0.06 and errors[-1] < 1e-3, errors
  for coarse, fine in zip(errors, errors[1:]):
    assert 3.5 < coarse / fine < 5.0, errors
  x_0 = solvers.edm_sampler(exact_denoiser, x_T, schedules.karras_sigmas(144, EPS, T)[::-1])
  np.testing.assert_allclose(x_0, x_T * SD / np.sqrt(T**2 + SD**2), rtol=1e-3)
  assert solvers.edm_sampler_nfe(18) == 35


def test_euler_is_first_order_and_heun_second_order():
  x = jnp.ones((1, 1)) * 3.0
  exact = lambda s, s2: x * np.sqrt(s2**2 + SD**2) / np.sqrt(s**2 + SD**2)
  errs = {}
  for name, step in (('euler', solvers.euler_step), ('heun', solvers.heun_step)):
    errs[name] = [float(jnp.abs(step(exact_denoiser, x, jnp.array([1.0]), jnp.array([1.0 - h])) - exact(1.0, 1.0 - h))[0, 0])
                  for h in (0.1, 0.05)]
  assert 3.5 < errs['euler'][0] / errs['euler'][1] < 4.5  # local error O(h^2)
  assert 7.0 < errs['heun'][0] / errs['heun'][1] < 9.0    # local error O(h^3)


def _ict_config(n):
  return ml_collections.ConfigDict(dict(
      objective=objective_config(name='ict', s0=n, s1=n, p_mean=-1.1, p_std=2.0, distance='pseudo_huber'),
      parameterization=dict(rho=7.0), train=dict(num_steps=1000), model=dict(num_classes=0)))


@pytest.mark.parametrize('distance', ['pseudo_huber', 'l2'])
def test_ict_gradient_vanishes_at_exact_consistency_function(distance):
  """CT's target replaces the ODE step by the one-sample estimate z, whose error z - E[z | x] has mean 0.

  So at f* the expected gradient of the (stop-gradient) CT/iCT loss vanishes up to O(Delta sigma), while the
  loss VALUE does not (it is a pseudo-objective); a perturbed f = f* + a x gets a clearly non-zero gradient
  that points back towards a = 0.
  """
  config = _ict_config(1280)
  config.objective.distance = distance
  model = OracleNet()
  objective = make_ict(config, model, EDM_)
  batch = {'image': SD * jax.random.normal(jax.random.PRNGKey(0), (8192, 4)), 'label': jnp.zeros(8192, jnp.int32)}
  grad = jax.jit(jax.grad(lambda a: objective.loss({'a': a, 'gate': 1.0}, {}, {}, batch, jax.random.PRNGKey(1),
                                                   0)[0]))
  g0, g_plus, g_minus = float(grad(0.0)), float(grad(0.05)), float(grad(-0.05))
  assert g_plus > 0 and g_minus < 0
  stationary_a = -g0 / ((g_plus - g_minus) / 0.1)  # where the (locally linear) gradient crosses zero
  assert abs(stationary_a) < 0.01, (g0, g_plus, g_minus)
