"""Tests for cm_jax.evaluation: Frechet distance and the digits proxy."""

import numpy as np
import pytest

from cm_jax.data.digits import load_digits
from cm_jax.evaluation.digits_proxy import DigitsProxy
from cm_jax.evaluation.frechet import feature_statistics, frechet_distance


def test_frechet_distance_matches_diagonal_closed_form():
  rng = np.random.default_rng(0)
  mu1, mu2 = rng.standard_normal(5), rng.standard_normal(5)
  a, b = rng.uniform(0.1, 3.0, 5), rng.uniform(0.1, 3.0, 5)
  expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
  actual = frechet_distance(mu1, np.diag(a), mu2, np.diag(b))
  np.testing.assert_allclose(actual, expected, rtol=1e-10)


def test_frechet_distance_is_zero_on_itself_and_symmetric():
  rng = np.random.default_rng(1)
  mixing = rng.standard_normal((8, 8))
  x = feature_statistics(rng.standard_normal((500, 8)) @ mixing)
  y = feature_statistics(rng.standard_normal((500, 8)) + 1.0)
  assert abs(frechet_distance(*x, *x)) < 1e-8
  np.testing.assert_allclose(frechet_distance(*x, *y), frechet_distance(*y, *x),
                             rtol=1e-8)


def test_frechet_distance_handles_singular_covariances():
  rng = np.random.default_rng(2)
  low_rank = rng.standard_normal((100, 2)) @ rng.standard_normal((2, 6))
  x, y = feature_statistics(low_rank), feature_statistics(low_rank + 1.0)
  np.testing.assert_allclose(frechet_distance(*x, *y), 6.0, atol=1e-4)


def test_feature_statistics():
  features = np.random.default_rng(3).standard_normal((50, 4))
  mu, sigma = feature_statistics(features)
  np.testing.assert_allclose(mu, features.mean(0))
  np.testing.assert_allclose(sigma, np.cov(features.T))


@pytest.fixture(scope='module')
def proxy():
  return DigitsProxy.train(seed=0)


@pytest.fixture(scope='module')
def digits():
  return load_digits('train')[0], load_digits('test')[0]


def test_classifier_accuracy(proxy):
  print(f'digits proxy classifier test accuracy: {proxy.test_accuracy:.4f}')
  assert proxy.test_accuracy >= 0.93


def test_real_digits_score_far_better_than_noise(proxy, digits):
  train, test = digits
  noise = np.random.default_rng(0).standard_normal(test.shape)
  real_fd, noise_fd = proxy.frechet(train), proxy.frechet(noise)
  print(f'FD(train digits) = {real_fd:.2f}, FD(Gaussian noise) = {noise_fd:.2f}')
  assert real_fd < 10 and noise_fd > 10 * real_fd


def test_frechet_decreases_as_noise_blends_into_digits(proxy, digits):
  train, _ = digits
  noise = np.random.default_rng(1).standard_normal(train.shape)
  fds = [proxy.frechet(w * noise + (1 - w) * train)
         for w in (1.0, 0.75, 0.5, 0.25, 0.0)]
  assert all(a > b for a, b in zip(fds, fds[1:])), fds


def test_features_shape_and_input_check(proxy, digits):
  assert proxy.features(digits[1][:7]).shape == (7, 64)
  with pytest.raises(ValueError, match='8, 8, 1'):
    proxy.features(np.zeros((7, 8, 8, 3), np.float32))


def test_save_load_round_trip(proxy, digits, tmp_path):
  path = tmp_path / 'cache' / 'proxy.msgpack'
  proxy.save(path)
  loaded = DigitsProxy.load(path)
  np.testing.assert_array_equal(loaded.features(digits[1]),
                                proxy.features(digits[1]))
  assert loaded.test_accuracy == proxy.test_accuracy


def test_load_errors_name_the_path(tmp_path):
  missing = tmp_path / 'missing.msgpack'
  with pytest.raises(FileNotFoundError, match='missing.msgpack'):
    DigitsProxy.load(missing)
  corrupt = tmp_path / 'corrupt.msgpack'
  corrupt.write_bytes(b'not a msgpack file')
  with pytest.raises(ValueError, match='corrupt.msgpack'):
    DigitsProxy.load(corrupt)
