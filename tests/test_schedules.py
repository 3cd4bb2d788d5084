"""Schedules against hand-computed values, and the traced-step property."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cm_jax import schedules


@pytest.mark.parametrize('k, expected', [
    (0, 11), (49_999, 11), (50_000, 21), (100_000, 41), (150_000, 81), (200_000, 161), (250_000, 321),
    (300_000, 641), (350_000, 1281), (399_999, 1281)])
def test_ict_num_scales_paper_values(k, expected):
  # K = 400k, s0 = 10, s1 = 1280: K' = floor(400k / (log2(128) + 1)) = 50k; N = min(10 * 2^floor(k/K'), 1280) + 1.
  assert int(schedules.ict_num_scales(k, 400_000, 10, 1280)) == expected


@pytest.mark.parametrize('k, expected', [(0, 2), (1, 3), (8_000, 16), (200_000, 76), (800_000, 151)])
def test_ct_num_scales_paper_values(k, expected):
  # N(k) = ceil(sqrt(k/K ((s1+1)^2 - s0^2) + s0^2) - 1) + 1, K = 800k, s0 = 2, s1 = 150:
  # k = 8000: sqrt(0.01 * (22801 - 4) + 4) = 15.231 -> ceil(14.231) + 1 = 15 + 1 = 16;
  # k = 200k: sqrt(0.25 * 22797 + 4) = 75.51 -> ceil(74.51) + 1 = 76.
  assert int(schedules.ct_num_scales(k, 800_000, 2, 150)) == expected


def test_ct_target_ema_conventions():
  # paper: mu(0) = exp(2 ln 0.9 / 2) = 0.9; official code divides by N - 1 = 1: mu(0) = 0.81.
  np.testing.assert_allclose(schedules.ct_target_ema(2, 2, 0.9, 'paper'), 0.9, rtol=1e-6)
  np.testing.assert_allclose(schedules.ct_target_ema(2, 2, 0.9, 'code'), 0.81, rtol=1e-6)
  np.testing.assert_allclose(schedules.ct_target_ema(151, 2, 0.9, 'paper'), np.exp(2 * np.log(0.9) / 151), rtol=1e-6)
  with pytest.raises(ValueError, match='convention'):
    schedules.ct_target_ema(2, 2, 0.9, 'other')


def test_karras_grid_endpoints_and_formula():
  grid = np.asarray(schedules.karras_sigmas(18))
  np.testing.assert_allclose([grid[0], grid[-1]], [0.002, 80.0], rtol=1e-5)
  i = 5
  expected = (0.002 ** (1 / 7) + i / 17 * (80 ** (1 / 7) - 0.002 ** (1 / 7))) ** 7
  np.testing.assert_allclose(grid[i], expected, rtol=1e-5)
  assert np.all(np.diff(grid) > 0)


def test_lognormal_index_distribution_masks_and_normalises():
  logits = schedules.lognormal_index_logits(11, 1281)
  probs = np.asarray(jax.nn.softmax(logits))
  assert np.all(probs[10:] == 0) and np.all(probs[:10] > 0)
  # Unnormalised masses are differences of the lognormal CDF at neighbouring grid points.
  from scipy.special import erf
  grid = np.asarray(schedules.karras_sigmas(11), np.float64)
  cdf = erf((np.log(grid) + 1.1) / (np.sqrt(2) * 2.0))
  np.testing.assert_allclose(probs[:10], np.diff(cdf) / np.diff(cdf).sum(), rtol=1e-4)


def test_curricula_trace_without_recompiling():
  traces = []

  @jax.jit
  def f(step):
    traces.append(1)
    n = schedules.ict_num_scales(step, 400_000, 10, 1280)
    return n, jax.random.categorical(jax.random.PRNGKey(0), schedules.lognormal_index_logits(n, 1281), shape=(64,))

  for k in (0, 60_000, 390_000):
    n, idx = f(jnp.int32(k))
    assert int(idx.max()) < int(n) - 1
  assert len(traces) == 1


def test_ema_rate_from_halflife():
  rate = schedules.ema_rate_from_halflife(500_000, 512)
  np.testing.assert_allclose(rate ** (500_000 / 512), 0.5, rtol=1e-6)


def test_lognormal_sigma_has_its_logarithm_normal():
  """ln sigma ~ N(-1.2, 1.2^2): over 10^5 draws the mean and std of ln sigma are within 0.02 of -1.2 and 1.2."""
  log_sigma = np.log(np.asarray(schedules.sample_lognormal_sigma(jax.random.PRNGKey(0), (100_000,), -1.2, 1.2)))
  assert abs(log_sigma.mean() + 1.2) < 0.02 and abs(log_sigma.std() - 1.2) < 0.02
