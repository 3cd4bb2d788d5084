"""Tests for cm_jax.evaluation.fid: streamed moments, the Inception Score, FID against an independent computation,
resumption, device-count invariance and --mode=fid end to end with the digits extractor."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cm_jax import distributed
from cm_jax import experiment
from cm_jax.data.digits import load_digits
from cm_jax.evaluation import fid
from cm_jax.evaluation.digits_proxy import DigitsProxy
from cm_jax.evaluation.frechet import frechet_distance
from configs import digits_ict
from helpers import run_main


def _stream_numpy_batches(features, logits, batch):
  """Moments of features/logits fed in padded batches of `batch`, as the device loop feeds them."""
  total = len(features)
  moments = fid.Moments()
  for first in range(0, total, batch):
    f = np.zeros((batch, features.shape[1]), np.float32)
    g = np.zeros((batch, logits.shape[1]), np.float32)
    n = min(batch, total - first)
    f[:n], g[:n] = features[first:first + n], logits[first:first + n]
    f[n:] = 1e3  # padding must not count
    moments.add(jax.device_get(jax.jit(fid.batch_moments, static_argnums=3)(f, g, first, total)))
  return moments


def test_streamed_moments_equal_numpy_mean_and_covariance():
  rng = np.random.default_rng(0)
  features = (rng.standard_normal((203, 6)) @ rng.standard_normal((6, 6)) + 5.0).astype(np.float32)
  logits = rng.standard_normal((203, 4)).astype(np.float32)
  moments = _stream_numpy_batches(features, logits, batch=32)
  mu, sigma = moments.statistics()
  assert moments.count == 203
  np.testing.assert_allclose(mu, features.astype(np.float64).mean(0), rtol=1e-6)
  np.testing.assert_allclose(sigma, np.cov(features.astype(np.float64), rowvar=False), rtol=1e-5, atol=1e-6)


def test_inception_score_equals_exp_mean_kl_per_split():
  rng = np.random.default_rng(1)
  total, classes = 250, 7
  logits = (3 * rng.standard_normal((total, classes))).astype(np.float32)
  moments = _stream_numpy_batches(rng.standard_normal((total, 3)).astype(np.float32), logits, batch=64)
  p = np.exp(logits - logits.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  scores = []
  for s in range(fid.IS_SPLITS):  # sample i in split floor(10 i / N): contiguous tenths
    part = p[[i for i in range(total) if i * fid.IS_SPLITS // total == s]]
    p_y = part.mean(0)
    scores.append(np.exp(np.mean(np.sum(part * (np.log(part) - np.log(p_y)), axis=1))))
  mean, std = moments.inception_score()
  np.testing.assert_allclose([mean, std], [np.mean(scores), np.std(scores)], rtol=1e-5)


def _trace_sqrt_product(s1, s2):
  """tr (S1 S2)^(1/2) = sum sqrt(eig(S1^(1/2) S2 S1^(1/2))), with eigh only (no sqrtm)."""
  w, v = np.linalg.eigh(s1)
  root = v @ np.diag(np.sqrt(np.clip(w, 0, None))) @ v.T
  return np.sum(np.sqrt(np.clip(np.linalg.eigvalsh(root @ s2 @ root), 0, None)))


@pytest.mark.parametrize('rank', [12, 3])  # full rank, and nearly singular (rank 3 plus 1e-9 I)
def test_frechet_distance_matches_an_eigendecomposition(rank):
  rng = np.random.default_rng(rank)
  a, b = rng.standard_normal((12, rank)), rng.standard_normal((12, rank))
  s1, s2 = a @ a.T + 1e-9 * np.eye(12), b @ b.T + 1e-9 * np.eye(12)
  mu1, mu2 = rng.standard_normal(12), rng.standard_normal(12)
  expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * _trace_sqrt_product(s1, s2)
  np.testing.assert_allclose(frechet_distance(mu1, s1, mu2, s2), expected, rtol=1e-6, atol=1e-6)


def test_quantize_gives_back_the_stored_pixels():
  u = np.arange(256, dtype=np.uint8)
  np.testing.assert_array_equal(np.asarray(fid.quantize(jnp.asarray(u / 127.5 - 1.0, jnp.float32))), u)
  # 127.5 x + 128 floored: x = -1 -> 0 (0.5 floored), x = 1 -> 255 (clipped from 255.5), x = 0.004 -> 128.
  np.testing.assert_array_equal(np.asarray(fid.quantize(jnp.asarray([-1.5, -1.0, 0.004, 1.0, 2.0]))),
                                [0, 0, 128, 255, 255])


def test_stream_continues_after_an_interruption(tmp_path):
  rng = np.random.default_rng(3)
  features = rng.standard_normal((10, 16, 5)).astype(np.float32)
  batch_fn = lambda i: jax.device_get(fid.batch_moments(features[i], None, i * 16, 160))
  path = tmp_path / 'progress.npz'
  calls = []

  def interrupted(i):
    calls.append(i)
    if i == 7:
      raise distributed.Preempted('stop')
    return batch_fn(i)

  with pytest.raises(distributed.Preempted):
    fid._stream(interrupted, 10, path, 'run-a', 3, 'test')
  assert path.exists()
  calls.clear()
  resumed = fid._stream(lambda i: calls.append(i) or batch_fn(i), 10, path, 'run-a', 3, 'test')
  assert calls == [6, 7, 8, 9]  # saved after batches 3 and 6
  assert not path.exists()
  whole = features.reshape(160, 5).astype(np.float64)
  np.testing.assert_allclose(resumed.statistics()[0], whole.mean(0), rtol=1e-6)
  np.testing.assert_allclose(resumed.statistics()[1], np.cov(whole, rowvar=False), rtol=1e-5, atol=1e-6)
  # Progress of another evaluation (other fingerprint) is not used.
  with pytest.raises(distributed.Preempted):
    fid._stream(interrupted, 10, path, 'run-a', 3, 'test')
  calls.clear()
  fid._stream(lambda i: calls.append(i) or batch_fn(i), 10, path, 'run-b', 3, 'test')
  assert calls == list(range(10))


@pytest.fixture(scope='module')
def proxy():
  return DigitsProxy.train(seed=0, steps=150)


def _tiny_digits(**overrides):
  c = digits_ict.get_config()
  c.model.hidden, c.model.depth, c.train.batch_size = 32, 1, 64
  c.update_from_flattened_dict(overrides)
  return c


def test_generated_moments_do_not_depend_on_the_device_count(proxy):
  extractor = fid.digits_extractor(proxy)
  out = []
  for devices in (jax.devices()[:1], jax.devices()[:8]):
    exp = experiment.Experiment(_tiny_digits(), devices)
    params = exp.init_state().ema[0]
    out.append(fid.generated_moments(exp, params, extractor, 150, 2, seed=5, batch=64).statistics())
  np.testing.assert_allclose(out[0][0], out[1][0], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out[0][1], out[1][1], rtol=1e-4, atol=1e-6)


def test_generated_moments_are_the_moments_of_the_drawn_samples(proxy):
  exp = experiment.Experiment(_tiny_digits(), jax.devices()[:4])
  params = exp.init_state().ema[0]
  moments = fid.generated_moments(exp, params, fid.digits_extractor(proxy), 150, 1, seed=9, batch=64)
  samples = exp.generate(params, 150, 1, seed=9)  # the same batches: fold_in(PRNGKey(9), i), 64 at a time
  features = proxy.features(samples)
  np.testing.assert_allclose(moments.statistics()[0], features.mean(0), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(moments.statistics()[1], np.cov(features, rowvar=False), rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_mode_fid_end_to_end_with_the_digits_extractor(tmp_path):
  workdir = tmp_path / 'run'
  flags = ['--config=configs/digits_ict.py', f'--workdir={workdir}', '--config.model.hidden=32',
           '--config.model.depth=1', '--config.train.batch_size=64', '--config.train.num_steps=4',
           '--config.train.log_every=2', '--config.eval.fid.extractor=digits', '--config.eval.fid.num_samples=200',
           '--config.eval.steps=(1,)']
  assert run_main(*flags).returncode == 0
  result = run_main(*flags, '--mode=fid')
  assert result.returncode == 0, result.stderr
  report = json.loads((workdir / 'fid.json').read_text())
  assert report['checkpoint_step'] == 4 and report['reference']['count'] == len(load_digits('train')[0])
  # Independently: the run's samples (same seeds and batches) through the cached classifier, against the train split.
  config = digits_ict.get_config()
  config.update_from_flattened_dict({'model.hidden': 32, 'model.depth': 1, 'train.batch_size': 64,
                                     'eval.fid.extractor': 'digits'})
  exp, state = experiment.restore_latest(config, str(workdir))
  classifier = DigitsProxy.load(workdir / 'proxy_classifier.msgpack')
  generated = classifier.features(exp.generate(state.ema[0], 200, 1, seed=0))
  reference = classifier.features(load_digits('train')[0])
  expected = frechet_distance(generated.mean(0), np.cov(generated, rowvar=False), reference.mean(0),
                              np.cov(reference, rowvar=False))
  np.testing.assert_allclose(report['results']['1-step']['fid'], expected, rtol=1e-4)
  assert (workdir / 'fid' / 'reference_digits_digits_train.npz').exists()
  assert not list((workdir / 'fid').glob('progress_*'))

  # Bad input, before sampling: statistics of another dimension, no or a missing Inception file.
  bad = tmp_path / 'bad.npz'
  np.savez(bad, mu=np.zeros(2048), sigma=np.eye(2048))
  for extra, words in (({'eval.fid.reference': str(bad)}, 'gives 64 features'),
                       ({'eval.fid.extractor': 'inception', 'eval.fid.inception_weights': str(tmp_path / 'none.pth')},
                        'pt_inception-2015-12-05-6726825d.pth'),
                       ({'eval.fid.extractor': 'inception'}, 'eval.fid.inception_weights is empty')):
    bad_config = config.copy_and_resolve_references()
    bad_config.update_from_flattened_dict(extra)
    with pytest.raises((ValueError, FileNotFoundError), match=words):
      fid.run(bad_config, str(workdir))
