"""LPIPS: VGG-16 structure, the weights file format and its errors, metric properties with random weights."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cm_jax import distances
from cm_jax import lpips

# A narrow VGG (same depths, 4-8 channels) keeps the 224x224 forward passes cheap on 2 cores.
TINY = lpips.LPIPS(widths=(4, 8, 8, 8, 8))


def _random_params(model, seed=0):
  """Random weights in the file's layout: He-normal VGG kernels, small biases, non-negative heads."""
  rng = np.random.default_rng(seed)
  out = {}
  for path, shape in lpips.expected_shapes(model).items():
    if path.startswith('lin'):
      out[path] = rng.uniform(0.0, 1.0, shape)
    elif path.endswith('bias'):
      out[path] = 0.01 * rng.standard_normal(shape)
    else:
      out[path] = rng.standard_normal(shape) * np.sqrt(2.0 / np.prod(shape[:-1]))
  return {k: v.astype(np.float32) for k, v in out.items()}


@pytest.fixture(scope='module')
def tiny_distance(tmp_path_factory):
  path = tmp_path_factory.mktemp('lpips') / 'tiny.npz'
  np.savez(path, **_random_params(TINY))
  return jax.jit(lpips.lpips_distance(str(path), TINY)), str(path)


def _images(seed, batch=3, size=32):
  return jnp.asarray(np.random.default_rng(seed).uniform(-1, 1, (batch, size, size, 3)), jnp.float32)


def test_vgg16_has_the_published_layout():
  shapes = lpips.expected_shapes()
  assert shapes['conv1_1/kernel'] == (3, 3, 3, 64) and shapes['conv5_3/kernel'] == (3, 3, 512, 512)
  assert [shapes[f'lin{i}/kernel'] for i in range(5)] == [(64, 1), (128, 1), (256, 1), (512, 1), (512, 1)]
  assert sum(int(np.prod(s)) for s in shapes.values()) == 14_714_688 + 1_472  # VGG-16 features + heads


def test_identity_symmetry_positivity(tiny_distance):
  distance, _ = tiny_distance
  x, y = _images(0), _images(1)
  d_xy, d_yx, d_xx = distance(x, y), distance(y, x), distance(x, x)
  assert d_xy.shape == (3,)
  np.testing.assert_allclose(d_xx, 0.0, atol=1e-7)
  np.testing.assert_allclose(d_xy, d_yx, rtol=1e-5)
  assert np.all(d_xy > 1e-3)


def test_inputs_are_resized_to_224_bilinearly(tiny_distance):
  distance, path = tiny_distance
  x, y = _images(2, batch=2), _images(3, batch=2)
  resized = lambda a: jax.image.resize(a, (2, 224, 224, 3), 'bilinear')
  expected = jax.jit(TINY.apply)({'params': lpips.load_params(path, TINY)}, resized(x), resized(y))
  np.testing.assert_allclose(distance(x, y), expected, rtol=1e-5)
  assert lpips.resize(x).shape == (2, 224, 224, 3)
  assert lpips.resize(_images(4, batch=1, size=256)).shape == (1, 256, 256, 3)  # large images are left as is


def test_registered_distance_names_a_missing_weights_file(tmp_path):
  missing = tmp_path / 'nowhere' / 'lpips_vgg16.npz'
  distance = distances.get_distance('lpips', str(missing))  # builds without reading: configs stay buildable
  with pytest.raises(FileNotFoundError, match=r'nowhere/lpips_vgg16\.npz.*lpips_weights'):
    distance(_images(0), _images(1))
  with pytest.raises(FileNotFoundError, match='lpips_weights'):
    distances.get_distance('lpips')(_images(0), _images(1))


def test_weights_file_is_checked_against_the_network(tmp_path):
  params = _random_params(TINY)
  params['conv2_1/kernel'] = params['conv2_1/kernel'][..., :2]
  del params['lin4/kernel']
  params['extra/kernel'] = np.zeros(3, np.float32)
  path = tmp_path / 'bad.npz'
  np.savez(path, **params)
  with pytest.raises(ValueError, match=r'missing lin4/kernel.*unexpected extra/kernel.*conv2_1/kernel has shape'):
    lpips.load_params(str(path), TINY)


def test_save_and_load_round_trip(tmp_path):
  params = lpips.load_params(_save(tmp_path, _random_params(TINY)), TINY)
  lpips.save_params(params, tmp_path / 'again.npz')
  again = lpips.load_params(str(tmp_path / 'again.npz'), TINY)
  jax.tree.map(np.testing.assert_array_equal, params, again)


def _save(tmp_path, params):
  path = tmp_path / 'w.npz'
  np.savez(path, **params)
  return str(path)
