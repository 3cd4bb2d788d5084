"""The discrete VP (DDPM) process, its timestep grids, DDIM and LCM sampling, and the DDPM loss.

Expected values come from numpy re-derivations of the formulas (reference sheet, section 7b) and from the Gaussian
oracle in VP form: for x0 ~ N(0, a^2 I), x_t = alpha_t x0 + sigma_t eps has E[eps | x_t] = sigma_t x_t / v_t and
E[x0 | x_t] = alpha_t a^2 x_t / v_t, v_t = alpha_t^2 a^2 + sigma_t^2; the PF-ODE maps x_t to x_s = x_t sqrt(v_s / v_t).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from cm_jax import sampling
from cm_jax import schedules
from cm_jax.objectives.ddpm import make_ddpm
from cm_jax.parameterization import VP

T = 1000
A = 0.5  # the oracle data's standard deviation


def numpy_alphas_cumprod(schedule='scaled_linear', start=0.00085, end=0.012):
  """alpha_t^2 from the betas, written out again: sqrt(beta) linear (scaled_linear) or beta linear."""
  if schedule == 'scaled_linear':
    betas = np.array([(np.sqrt(start) + (np.sqrt(end) - np.sqrt(start)) * i / (T - 1)) ** 2 for i in range(T)])
  else:
    betas = np.array([start + (end - start) * i / (T - 1) for i in range(T)])
  return np.cumprod(1.0 - betas)


ABAR = numpy_alphas_cumprod()
ALPHA, SIGMA = np.sqrt(ABAR), np.sqrt(1.0 - ABAR)
VAR = ALPHA**2 * A**2 + SIGMA**2


class EpsOracle(nn.Module):
  """F(x_t, t) = scale * sigma_t x_t / v_t: the exact epsilon-predictor of N(0, a^2 I) data times `scale`."""
  scale: float = 1.0

  @nn.compact
  def __call__(self, x, c_noise, cond=None, train=False):
    self.param('unused', nn.initializers.zeros, ())
    t = jnp.asarray(c_noise, jnp.int32)
    factor = jnp.asarray(SIGMA / VAR, jnp.float32)[t]
    return self.scale * factor.reshape((-1,) + (1,) * (x.ndim - 1)) * x


class ConsistencyOracle(nn.Module):
  """The epsilon-network whose LCM consistency function c_skip x + c_out x0_hat is the exact f*(x_t, t) =
  x_t sqrt(v_0 / v_t) of Gaussian data (for t >= 1, where c_out > 0)."""

  @nn.compact
  def __call__(self, x, c_noise, cond=None, train=False):
    self.param('unused', nn.initializers.zeros, ())
    t = np.arange(T)
    u = 10.0 * t
    c_skip, c_out = 0.25 / (u**2 + 0.25), u / np.sqrt(u**2 + 0.25)
    with np.errstate(divide='ignore', invalid='ignore'):
      x0_factor = (np.sqrt(VAR[0] / VAR) - c_skip) / c_out  # x0_hat = x0_factor x
    eps_factor = np.nan_to_num((1.0 - ALPHA * x0_factor) / SIGMA)  # x0_hat = (x - sigma eps) / alpha
    factor = jnp.asarray(eps_factor, jnp.float32)[jnp.asarray(c_noise, jnp.int32)]
    return factor.reshape((-1,) + (1,) * (x.ndim - 1)) * x


def _config(**sampling_keys):
  return ml_collections.ConfigDict(dict(
      parameterization=dict(name='vp'), objective=dict(name='lcd', skip=20), model=dict(num_classes=0),
      sampling=dict(dict(guidance_scale=1.0), **sampling_keys)))


def test_alphas_of_both_beta_schedules_and_the_clean_end():
  vp = VP()
  t = jnp.array([-1, 0, 1, 499, 999])
  alpha, sigma = vp.alpha_sigma(t)
  np.testing.assert_allclose(alpha, np.r_[1.0, ALPHA[[0, 1, 499, 999]]], rtol=1e-6)
  np.testing.assert_allclose(sigma, np.r_[0.0, SIGMA[[0, 1, 499, 999]]], rtol=1e-5, atol=1e-7)
  assert 0.0046 < float(alpha[-1] ** 2) < 0.0048  # Stable Diffusion's alphas_cumprod[999] = 0.00466
  linear = VP(beta_schedule='linear', beta_start=1e-4, beta_end=0.02)
  np.testing.assert_allclose(linear.alpha_sigma(jnp.array([999]))[0] ** 2,
                             numpy_alphas_cumprod('linear', 1e-4, 0.02)[[999]], rtol=1e-5)
  with pytest.raises(ValueError, match='beta_schedule'):
    VP(beta_schedule='cosine')
  with pytest.raises(ValueError, match='prediction'):
    VP(prediction='score')


@pytest.mark.parametrize('prediction', ['epsilon', 'v', 'sample'])
def test_every_prediction_type_recovers_x0_and_eps(prediction):
  """A network that outputs the exact target (eps, v = alpha eps - sigma x0, or x0) gives back x0 and eps."""
  rng = np.random.default_rng(0)
  x0, eps = rng.standard_normal((2, 6, 3))
  t = np.array([0, 5, 100, 500, 900, 999])
  alpha, sigma = ALPHA[t][:, None], SIGMA[t][:, None]
  target = {'epsilon': eps, 'v': alpha * eps - sigma * x0, 'sample': x0}[prediction]
  vp = VP(prediction=prediction)
  x_t = alpha * x0 + sigma * eps
  np.testing.assert_allclose(vp.noise(jnp.asarray(x0), jnp.asarray(eps), jnp.asarray(t)), x_t, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(vp.target(jnp.asarray(x0), jnp.asarray(eps), jnp.asarray(t)), target, rtol=1e-4,
                             atol=1e-5)
  x0_hat, eps_hat = vp.predict(lambda x, c: jnp.asarray(target, jnp.float32), jnp.asarray(x_t, jnp.float32), t)
  np.testing.assert_allclose(x0_hat, x0, atol=2e-3 if prediction == 'epsilon' else 1e-4)  # 1 / alpha_999 = 15
  np.testing.assert_allclose(eps_hat, eps, atol=1e-2 if prediction == 'sample' else 1e-4)  # 1 / sigma_0 = 34


def test_ddim_step_and_lcm_boundary_scalings_by_hand():
  vp = VP()
  x0, eps = jnp.full((2, 3), 0.3), jnp.full((2, 3), -1.2)
  out = vp.ddim_step(x0, eps, jnp.array([499, -1]))
  np.testing.assert_allclose(out[0], ALPHA[499] * 0.3 - SIGMA[499] * 1.2, rtol=1e-5)
  np.testing.assert_allclose(out[1], 0.3, rtol=1e-6)
  c_skip, c_out = vp.consistency_scalings(jnp.array([0, 19, 999]))
  np.testing.assert_allclose(c_skip, [1.0, 0.25 / (190.0**2 + 0.25), 0.25 / (9990.0**2 + 0.25)], rtol=1e-5)
  np.testing.assert_allclose(c_out, [0.0, 190.0 / np.sqrt(190.0**2 + 0.25), 9990.0 / np.sqrt(9990.0**2 + 0.25)],
                             rtol=1e-6)
  x = jnp.ones((1, 2))
  np.testing.assert_array_equal(vp.consistency(lambda y, c: 100.0 * y, x, jnp.array([0])), x)  # f(x, 0) = x


def test_timestep_grids():
  np.testing.assert_array_equal(schedules.ddim_timesteps(50), 999 - 20 * np.arange(50))
  np.testing.assert_array_equal(schedules.ddim_timesteps(2), [999, 499])
  np.testing.assert_array_equal(schedules.skipping_grid(1000, 20), 20 * np.arange(1, 51) - 1)
  np.testing.assert_array_equal(schedules.lcm_timesteps(4, 1000, 20), [999, 759, 499, 259])
  np.testing.assert_array_equal(schedules.lcm_timesteps(1, 1000, 20), [999])
  np.testing.assert_array_equal(schedules.lcm_timesteps(2, 1000, 20), [999, 499])
  np.testing.assert_array_equal(schedules.lcm_timesteps(8, 1000, 20), [999, 879, 759, 639, 499, 379, 259, 139])
  t, t_prev = schedules.sample_skipping_pair(jax.random.PRNGKey(0), 4096, 1000, 20)
  pairs = set(zip(np.asarray(t).tolist(), np.asarray(t_prev).tolist()))
  assert pairs == {(19, 0)} | {(20 * i - 1, 20 * i - 21) for i in range(2, 51)}
  with pytest.raises(ValueError, match='objective.skip=30'):
    schedules.skipping_grid(1000, 30)
  with pytest.raises(ValueError, match='5-step LCM'):
    schedules.lcm_timesteps(5, 100, 25)


def test_ddpm_loss_of_the_oracle_is_the_posterior_variance():
  """E mean_D (eps - E[eps | x_t])^2 = E_t (1 - sigma_t^2 / v_t) for the oracle; a wrong predictor does worse."""
  config = ml_collections.ConfigDict(dict(model=dict(num_classes=0), objective=dict(name='ddpm')))
  batch = {'image': A * jax.random.normal(jax.random.PRNGKey(1), (16384, 4)), 'label': jnp.zeros((16384,), jnp.int32)}
  loss = lambda scale: float(make_ddpm(config, EpsOracle(scale), VP()).loss(
      {'unused': 0.0}, {}, {}, batch, jax.random.PRNGKey(2), 0)[0])
  np.testing.assert_allclose(loss(1.0), np.mean(1.0 - SIGMA**2 / VAR), rtol=0.03)
  assert loss(1.2) > 1.05 * loss(1.0)


def test_ddim_sampler_follows_the_numpy_recursion_on_the_oracle():
  """On the oracle every DDIM step is linear: x <- (alpha' alpha a^2 / v + sigma' sigma / v) x along 999, 979, ...,
  19, then x0_hat = alpha a^2 x / v; the sample's std is the product of the factors (x_999 ~ N(0, 1))."""
  ts = [999 - 20 * i for i in range(50)]
  factor = 1.0
  for t, t_prev in zip(ts, ts[1:] + [None]):
    x0_f, eps_f = ALPHA[t] * A**2 / VAR[t], SIGMA[t] / VAR[t]
    factor *= x0_f if t_prev is None else ALPHA[t_prev] * x0_f + SIGMA[t_prev] * eps_f
  sample = jax.jit(sampling.DDIM.build(_config(), EpsOracle(), VP()), static_argnames=('shape', 'num_steps'))
  x = sample({'unused': 0.0}, jax.random.PRNGKey(0), None, shape=(8192, 8), num_steps=50)
  np.testing.assert_allclose(float(jnp.std(x)), factor, rtol=0.02)
  # and the recursion is close to the exact flow's: x_19 has std sqrt(v_19 / v_999), x0_hat(x_19) = alpha a^2 x / v
  np.testing.assert_allclose(factor, ALPHA[19] * A**2 / np.sqrt(VAR[19] * VAR[999]), rtol=0.03)


@pytest.mark.parametrize('num_steps', [1, 2, 4])
def test_lcm_sampler_of_the_exact_consistency_function_has_the_data_variance(num_steps):
  """f*(x_t, t) = x_t sqrt(v_0 / v_t) maps the marginal at t to the one at 0; re-noising x0 -> alpha x0 + sigma z
  keeps every step on the marginals, so any number of steps gives var v_0 (x_999 ~ N(0, 1): v_999 = 0.9988 ~ 1)."""
  sample = jax.jit(sampling.LCM.build(_config(), ConsistencyOracle(), VP()), static_argnames=('shape', 'num_steps'))
  x = sample({'unused': 0.0}, jax.random.PRNGKey(0), None, shape=(8192, 8), num_steps=num_steps)
  np.testing.assert_allclose(float(jnp.var(x)), VAR[0] / VAR[999], rtol=0.03)


def test_ddim_guidance_needs_an_unconditional_branch():
  with pytest.raises(ValueError, match='classifier-free guidance scale for DDIM'):
    sampling.DDIM.build(_config(guidance_scale=2.0), EpsOracle(), VP())
