"""LPIPS: VGG-16 structure, the weights file format and its errors, metric properties with random weights."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cm_jax import distances
from cm_jax import lpips
from cm_jax.models import build_model
from cm_jax.objectives import make_objective
from configs import digits_ct

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
  params = lpips.load_params(path, TINY)
  return jax.jit(functools.partial(lpips.lpips_distance(TINY), params=params)), str(path)


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


def test_registered_distance_reads_its_weights_as_a_step_input(tmp_path, tiny_distance):
  missing = tmp_path / 'nowhere' / 'lpips_vgg16.npz'
  load = distances.step_inputs('lpips', str(missing))  # builds without reading: configs stay buildable
  assert set(load(abstract=True)['lpips']) == {k.split('/')[0] for k in lpips.expected_shapes()}
  with pytest.raises(FileNotFoundError, match=r'nowhere/lpips_vgg16\.npz.*lpips_weights'):
    load()
  with pytest.raises(FileNotFoundError, match='lpips_weights'):
    distances.step_inputs('lpips')()
  assert distances.step_inputs('l2', str(missing))() == {}
  distance, path = tiny_distance
  x, y = _images(5), _images(6)
  params = lpips.load_params(path, TINY)
  np.testing.assert_allclose(lpips.lpips_distance(TINY)(x, y, params), distance(x, y), rtol=1e-6)
  registered = distances.get_distance('lpips')  # the full VGG-16: its wiring checked on shapes only
  assert jax.eval_shape(registered, x, y, inputs=load(abstract=True)).shape == (3,)


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


def test_lpips_weights_are_an_input_of_the_loss_not_constants_of_its_program():
  config = digits_ct.get_config()
  config.objective.update(distance='lpips', lpips_weights='read by the trainer, not here')
  model = build_model(config.model)
  objective = make_objective(config, model)
  x = jax.ShapeDtypeStruct((2, 8, 8, 3), jnp.float32)
  params = jax.eval_shape(model.init, jax.random.PRNGKey(0), x, jax.ShapeDtypeStruct((2,), jnp.float32))['params']
  inputs = {'target': params, 'teacher': None, **objective.inputs(abstract=True)}
  jaxpr = jax.make_jaxpr(functools.partial(objective.loss, extra={}, rng=jax.random.PRNGKey(0), step=0))(
      params, inputs=inputs, batch={'image': x})
  constant_bytes = sum(np.asarray(c).nbytes for c in jaxpr.consts)
  weight_bytes = 4 * sum(int(np.prod(s)) for s in lpips.expected_shapes().values())
  assert constant_bytes < 1e-3 * weight_bytes, constant_bytes  # the 59 MB of VGG-16 come in through `inputs`
