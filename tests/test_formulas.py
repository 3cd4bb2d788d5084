"""The reference sheet's formulas against values computed independently of cm_jax: by hand, in float64 numpy from the
papers' equations, or in closed form on Gaussian data (tests/oracle.py).

Every expected value below is written from the paper, never through the function under test; the Monte Carlo ones
(losses on Gaussian data) have relative standard errors under 1% against tolerances of 1-3%.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from cm_jax.objectives.diffusion import make_edm, make_trigflow_diffusion
from cm_jax.objectives import objective_config
from cm_jax.objectives.discrete import make_ct, make_ict
from cm_jax.parameterization import EDM, TrigFlow
from oracle import EPS, SD, T, DenoiserOracle, OracleNet, TrigFlowOracle

# Two processes: the paper's, and one where every constant differs (a constant written in the code instead of the
# field would show).
PROCESSES = [dict(sigma_data=0.5, sigma_min=0.002, sigma_max=80.0),
             dict(sigma_data=0.7, sigma_min=0.01, sigma_max=20.0)]
SIGMAS = np.array([0.002, 0.01, 0.3, 0.5, 2.0, 17.0, 80.0])


def _probe(x_in, c_noise):
  """A network whose output depends on both inputs in a known way."""
  return 3.0 * x_in + x_in**2 + c_noise[:, None]


# ----------------------------------------------------------------------------------------------------------
# EDM preconditioning and the CM boundary scalings (reference section 1).
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('p', PROCESSES)
def test_edm_scalings_follow_the_papers(p):
  sd, eps, s = p['sigma_data'], p['sigma_min'], SIGMAS[SIGMAS >= p['sigma_min']]
  edm = EDM(**p)
  c_skip, c_out = edm.denoiser_scalings(jnp.asarray(s))
  np.testing.assert_allclose(c_skip, sd**2 / (s**2 + sd**2), rtol=1e-6)
  np.testing.assert_allclose(c_out, s * sd / np.sqrt(s**2 + sd**2), rtol=1e-6)
  np.testing.assert_allclose(edm.c_in(jnp.asarray(s)), 1.0 / np.sqrt(s**2 + sd**2), rtol=1e-6)
  np.testing.assert_allclose(edm.c_noise(jnp.asarray(s)), 0.25 * np.log(s), rtol=1e-6, atol=1e-7)
  c_skip, c_out = edm.consistency_scalings(jnp.asarray(s))
  np.testing.assert_allclose(c_skip, sd**2 / ((s - eps) ** 2 + sd**2), rtol=1e-6)
  np.testing.assert_allclose(c_out, sd * (s - eps) / np.sqrt(sd**2 + s**2), rtol=1e-5, atol=1e-9)
  np.testing.assert_allclose(edm.diffusion_weight(jnp.asarray(s)), (s**2 + sd**2) / (s * sd) ** 2, rtol=1e-6)


def test_edm_scalings_by_hand_at_sigma_half():
  """sigma = sd = 0.5: c_skip' = 1/2, c_out' = 0.25 / sqrt(0.5) = 0.353553, c_in = sqrt(2) = 1.414214,
  c_noise = ln(0.5) / 4 = -0.173287, lambda = 0.5 / 0.0625 = 8; CM: c_skip = 0.25 / (0.498^2 + 0.25) = 0.502004,
  c_out = 0.5 * 0.498 / sqrt(0.5) = 0.352139."""
  edm, s = EDM(), jnp.array([0.5])
  np.testing.assert_allclose(np.concatenate(edm.denoiser_scalings(s)), [0.5, 0.353553], rtol=1e-5)
  np.testing.assert_allclose(edm.c_in(s), [1.414214], rtol=1e-6)
  np.testing.assert_allclose(edm.c_noise(s), [-0.173287], rtol=1e-5)
  np.testing.assert_allclose(edm.diffusion_weight(s), [8.0], rtol=1e-6)
  np.testing.assert_allclose(np.concatenate(edm.consistency_scalings(s)), [0.502004, 0.352139], rtol=1e-5)


@pytest.mark.parametrize('p', PROCESSES)
def test_edm_preconditioning_composes_the_scalings(p):
  """D = c_skip' x + c_out' F(c_in x, c_noise) and f = c_skip x + c_out F(c_in x, c_noise); f(x, eps) = x exactly."""
  sd, eps = p['sigma_data'], p['sigma_min']
  edm = EDM(**p)
  rng = np.random.default_rng(0)
  s = np.array([eps, 0.05, 1.3, 15.0])
  x = rng.standard_normal((4, 3)) * 2.0
  col = s[:, None]
  out = _probe(x / np.sqrt(col**2 + sd**2), 0.25 * np.log(s))
  expected_d = sd**2 / (col**2 + sd**2) * x + col * sd / np.sqrt(col**2 + sd**2) * out
  expected_f = sd**2 / ((col - eps) ** 2 + sd**2) * x + sd * (col - eps) / np.sqrt(sd**2 + col**2) * out
  np.testing.assert_allclose(edm.denoise(_probe, jnp.asarray(x), jnp.asarray(s)), expected_d, rtol=1e-5)
  np.testing.assert_allclose(edm.consistency(_probe, jnp.asarray(x), jnp.asarray(s)), expected_f, rtol=1e-5)
  np.testing.assert_array_equal(edm.consistency(_probe, jnp.asarray(x[:1]), jnp.asarray(s[:1])),
                                jnp.asarray(x[:1]))


def test_edm_renoise_keeps_the_boundary_level():
  """CM Algorithm 1: x_sigma = x + sqrt(sigma^2 - eps^2) z."""
  z, x, s = np.full((3, 1), 1.0), np.full((3, 1), 0.5), np.array([0.002, 0.003, 3.0])
  expected = x + np.sqrt(s**2 - 0.002**2)[:, None] * z  # 0.5, 0.502236, 3.499999
  np.testing.assert_allclose(EDM().renoise(jnp.asarray(x), jnp.asarray(z), jnp.asarray(s)), expected, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# TrigFlow (reference section 5).
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('sd', [0.5, 0.8])
def test_trigflow_formulas(sd):
  """t = arctan(sigma / sd); x_t = cos(t) x_sigma; x_t = cos(t) x0 + sin(t) z; f = cos(t) x - sin(t) sd F(x / sd, t);
  dx_t/dt = (cos(t) x_t - x0_hat) / sin(t); re-noising cos(t) x + sin(t) sd z; prior sd z."""
  tf = TrigFlow(sigma_data=sd)
  rng = np.random.default_rng(1)
  x, z = rng.standard_normal((2, 4, 3))
  sigma = np.array([0.01, 0.4, 2.0, 60.0])
  t = np.arctan(sigma / sd)
  c, s = np.cos(t)[:, None], np.sin(t)[:, None]
  j = jnp.asarray
  np.testing.assert_allclose(tf.t_from_sigma(j(sigma)), t, rtol=1e-6)
  np.testing.assert_allclose(tf.t_max, np.arctan(80.0 / sd), rtol=1e-12)
  np.testing.assert_allclose(tf.x_from_sigma(j(x), j(sigma)), c * x, rtol=1e-4)
  np.testing.assert_allclose(tf.noise(j(x), j(z), j(t)), c * x + s * z, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(tf.renoise(j(x), j(z), j(t)), c * x + s * sd * z, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(tf.prior(j(z)), sd * z, rtol=1e-6)
  expected_f = c * x - s * sd * _probe(x / sd, t)
  np.testing.assert_allclose(tf.consistency(_probe, j(x), j(t)), expected_f, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(tf.velocity_from_denoiser(j(x), j(t), j(z)), (c * x - z) / s, rtol=1e-5)


def test_trigflow_t_max_by_hand():
  """t_max = arctan(80 / 0.5) = 1.5645 (reference section 5)."""
  assert TrigFlow().t_max == pytest.approx(1.5645, abs=1e-4)


# ----------------------------------------------------------------------------------------------------------
# Teacher losses at the exact denoiser, Gaussian data x0 ~ N(0, a^2 I): closed forms.
# ----------------------------------------------------------------------------------------------------------
def _config(objective):
  return ml_collections.ConfigDict(dict(objective=objective_config(**objective), model=dict(num_classes=0),
                                        parameterization=dict(rho=7.0), train=dict(num_steps=1000)))


def _gaussian(a, shape, seed=0):
  return {'image': a * jax.random.normal(jax.random.PRNGKey(seed), shape)}


@pytest.mark.parametrize('a', [SD, 1.0])
@pytest.mark.parametrize('sigma', [0.1, 1.0, 10.0])
def test_edm_teacher_loss_at_the_exact_denoiser(a, sigma):
  """lambda(sigma) E||D* - x0||^2 / D with D* = a^2 / (sigma^2 + a^2) x: the error has variance sigma^2 a^2 /
  (sigma^2 + a^2) per dimension, so the loss is (sigma^2 + sd^2) a^2 / ((sigma^2 + a^2) sd^2) (1 when a = sd).
  ln sigma ~ N(ln sigma, 1e-8): every sample at one level."""
  objective = make_edm(_config(dict(name='edm', p_mean=float(np.log(sigma)), p_std=1e-8)), DenoiserOracle(a),
                       EDM(sigma_data=SD))
  loss = float(objective.loss({}, {}, {}, _gaussian(a, (8192, 32)), jax.random.PRNGKey(1), 0)[0])
  np.testing.assert_allclose(loss, (sigma**2 + SD**2) * a**2 / ((sigma**2 + a**2) * SD**2), rtol=0.01)


@pytest.mark.parametrize('a', [SD, 2 * SD])
@pytest.mark.parametrize('sigma', [0.1, 1.0, 10.0])
def test_trigflow_teacher_loss_at_the_exact_velocity(a, sigma):
  """E||F* - v_t / sd||^2 / D with v_t = cos(t) z - sin(t) x0 and F* = E[v_t | x_t] / sd: the residual variance is
  Var v - Cov(v, x)^2 / Var x = sd^2 a^2 / v(t), so the loss is a^2 / (a^2 cos^2 t + sd^2 sin^2 t) (1 when a = sd)."""
  objective = make_trigflow_diffusion(_config(dict(name='trigflow', p_mean=float(np.log(sigma)), p_std=1e-8)),
                                      TrigFlowOracle(a), TrigFlow(sigma_data=SD))
  params = {'alpha': 0.0, 'teacher': 1.0}
  loss = float(objective.loss(params, {}, {}, _gaussian(a, (8192, 32)), jax.random.PRNGKey(1), 0)[0])
  t = np.arctan(sigma / SD)
  np.testing.assert_allclose(loss, a**2 / (a**2 * np.cos(t) ** 2 + SD**2 * np.sin(t) ** 2), rtol=0.01)


# ----------------------------------------------------------------------------------------------------------
# Discrete consistency losses: the level pair, lambda and the boundary, with x0 = 0 and f = f* + 0.5 x.
# ----------------------------------------------------------------------------------------------------------
def _karras(i, n):
  """sigma_i = (eps^(1/7) + i / (N - 1) (T^(1/7) - eps^(1/7)))^7 (reference section 1, 0-based i)."""
  return (EPS ** (1 / 7) + i / (n - 1) * (T ** (1 / 7) - EPS ** (1 / 7))) ** 7


def _f(sigma, a=0.5):
  """f*(x, sigma) / x + a: f of the perturbed oracle is this factor times x."""
  return np.sqrt(EPS**2 + SD**2) / np.sqrt(sigma**2 + SD**2) + a


def _pair_loss(sigma, sigma_next, weight):
  """lambda d(f(x0 + sigma_{n+1} z, sigma_{n+1}), f(x0 + sigma_n z, sigma_n)) with x0 = 0 and d = mean_D (.)^2:
  weight (f(sigma_{n+1}) sigma_{n+1} - f(sigma_n) sigma_n)^2 E[z^2]; f(eps) = 1 (the boundary: f(x, eps) = x)."""
  f_lo = 1.0 if sigma == EPS else _f(sigma)
  return weight * (_f(sigma_next) * sigma_next - f_lo * sigma) ** 2


OFFSET = {'a': jnp.float32(0.5), 'gate': jnp.float32(1.0)}
ZERO_DATA = {'image': jnp.zeros((512, 1024))}


@pytest.mark.parametrize('pair, p_mean', [(0, np.log(0.5)), (1, np.log(10.0))], ids=['lower pair', 'upper pair'])
def test_ict_weight_is_one_over_the_level_gap(pair, p_mean):
  """iCT with s0 = s1 = 2: N = 3 levels (eps, sigma_1 = 2.5152, T); the lognormal index distribution with P_std = 0.1
  puts all its mass on the pair around e^P_mean, and lambda = 1 / (sigma_{n+1} - sigma_n)."""
  config = _config(dict(name='ict', s0=2, s1=2, p_mean=float(p_mean), p_std=0.1, distance='l2'))
  objective = make_ict(config, OracleNet(), EDM(sigma_data=SD, sigma_min=EPS, sigma_max=T))
  loss, metrics = objective.loss(OFFSET, {}, {}, ZERO_DATA, jax.random.PRNGKey(0), 0)
  assert int(metrics['num_scales']) == 3
  sigma, sigma_next = _karras(pair, 3), _karras(pair + 1, 3)
  np.testing.assert_allclose(float(loss), _pair_loss(sigma, sigma_next, 1.0 / (sigma_next - sigma)), rtol=0.01)


def _ct(num_steps=1000):
  config = _config(dict(name='ct', s0=2, s1=150, mu0=0.9, mu_convention='paper', distance='l2'))
  config.train.num_steps = num_steps
  return make_ct(config, OracleNet(), EDM(sigma_data=SD, sigma_min=EPS, sigma_max=T))


def test_ct_starts_with_s0_levels_and_unit_weight():
  """CT at step 0 with s0 = 2: N(0) = 2, the single pair (eps, T), lambda = 1."""
  loss, metrics = _ct().loss(OFFSET, {}, {'target': OFFSET}, ZERO_DATA, jax.random.PRNGKey(0), 0)
  assert int(metrics['num_scales']) == 2
  np.testing.assert_allclose(float(loss), _pair_loss(EPS, T, 1.0), rtol=0.01)


def test_ct_draws_every_pair_of_the_final_grid_uniformly():
  """At k = K, N(K) = s1 + 1 = 151 and n ~ U{0, ..., 149}: the loss is the average of the 150 pairs' losses
  (the last pair, (76.2, 80), carries 6% of it)."""
  n = 151
  expected = np.mean([_pair_loss(_karras(i, n), _karras(i + 1, n), 1.0) for i in range(n - 1)])
  batch = {'image': jnp.zeros((65536, 4))}
  loss, metrics = _ct().loss(OFFSET, {}, {'target': OFFSET}, batch, jax.random.PRNGKey(0), 1000)
  assert int(metrics['num_scales']) == n
  np.testing.assert_allclose(float(loss), expected, rtol=0.03)
