"""FID Inception-v3: parity with torch-fidelity on random weights, the torch-free state-dict reader, errors, resize.

tests/data/tiny_state_dict_{zip,legacy}.pth were written once with torch 2.13 (repository root as working directory):

  import collections, torch
  base = torch.arange(12, dtype=torch.float32) * 0.5 - 1
  sd = collections.OrderedDict([
      ('conv.weight', torch.arange(24, dtype=torch.float32).reshape(2, 3, 2, 2) / 8),
      ('view.offset', base[2:8].view(2, 3)),
      ('view.transposed', base.view(3, 4).t()),
      ('bn.num_batches_tracked', torch.tensor(7)),
      ('empty', torch.zeros(0, 3)),
  ])
  torch.save(sd, 'tests/data/tiny_state_dict_zip.pth')
  torch.save(sd, 'tests/data/tiny_state_dict_legacy.pth', _use_new_zipfile_serialization=False)

The two views share one storage (offset 2; strides (1, 4)), so the reader's offset and stride handling is checked.
The parity tests need torch and torch-fidelity 0.4.0 (`pip install --no-deps torch-fidelity==0.4.0`; its package
__init__ imports torchvision, so the three modules used are imported under a bare package entry).
"""

import importlib
import importlib.util
import pathlib
import pickle
import sys
import zipfile

import jax
import numpy as np
import pytest

from cm_jax.evaluation import inception
from cm_jax.evaluation import torch_pickle

DATA = pathlib.Path(__file__).parent / 'data'


def _tiny_expected():
  """The values written to tests/data/tiny_state_dict_*.pth, recomputed with numpy."""
  base = np.arange(12, dtype=np.float32) * 0.5 - 1
  return {'conv.weight': np.arange(24, dtype=np.float32).reshape(2, 3, 2, 2) / 8,
          'view.offset': base[2:8].reshape(2, 3),
          'view.transposed': base.reshape(3, 4).T,
          'bn.num_batches_tracked': np.array(7, np.int64),
          'empty': np.zeros((0, 3), np.float32)}


@pytest.mark.parametrize('fmt', ['zip', 'legacy'])
def test_reads_both_torch_save_formats_without_torch(fmt):
  state_dict = torch_pickle.load_state_dict(DATA / f'tiny_state_dict_{fmt}.pth')
  expected = _tiny_expected()
  assert list(state_dict) == list(expected)
  for key, value in expected.items():
    assert state_dict[key].dtype == value.dtype and state_dict[key].shape == value.shape, key
    np.testing.assert_array_equal(state_dict[key], value, err_msg=key)


# ---------------------------------------------------------------------------------------------------------------
# Errors.


def test_missing_file_names_the_weights_file_and_url(tmp_path):
  with pytest.raises(FileNotFoundError) as e:
    inception.load(tmp_path / 'nowhere.pth')
  assert inception.WEIGHTS_FILE in str(e.value) and inception.WEIGHTS_URL in str(e.value)
  assert '\n' not in str(e.value)


@pytest.mark.parametrize('contents', [b'these bytes are no pickle\n\x00\x01',
                                      (DATA / 'tiny_state_dict_legacy.pth').read_bytes()[:-4]],
                         ids=['garbage', 'truncated'])
def test_unreadable_file_is_a_one_line_value_error(tmp_path, contents):
  path = tmp_path / 'weights.pth'
  path.write_bytes(contents)
  with pytest.raises(ValueError, match='not a readable PyTorch state dict') as e:
    inception.load(path)
  assert str(path) in str(e.value) and '\n' not in str(e.value)


_CALLS = []


def _record(*args):
  _CALLS.append(args)


class _Payload:
  """Unpickles as a call of _record: a global a state dict never needs."""

  def __reduce__(self):
    return _record, ('ran',)


@pytest.mark.parametrize('fmt', ['zip', 'legacy'])
def test_unknown_globals_are_refused_not_called(tmp_path, fmt):
  path = tmp_path / 'payload.pth'
  payload = pickle.dumps({'w': _Payload()}, protocol=2)
  if fmt == 'zip':
    with zipfile.ZipFile(path, 'w') as archive:
      archive.writestr('payload/data.pkl', payload)
  else:
    path.write_bytes(b''.join(pickle.dumps(x, protocol=2) for x in (0x1950a86a20f9469cfc6c, 1001,
                                                                       {'little_endian': True})) + payload)
  with pytest.raises(ValueError, match=r'refusing the global .*_record'):
    torch_pickle.load_state_dict(path)
  assert not _CALLS


def _zeros_state_dict():
  """A complete state dict of zeros (views of one scalar, no memory), keys from inception.state_dict_shapes()."""
  return {k: np.broadcast_to(np.float32(0), s) for k, s in inception.state_dict_shapes().items()}


def test_zeros_state_dict_without_num_batches_tracked_maps_to_flax_layout():
  variables = inception.params_from_state_dict(_zeros_state_dict())
  assert variables['params']['Conv2d_1a_3x3']['conv']['kernel'].shape == (3, 3, 3, 32)
  assert variables['params']['Mixed_6b']['branch7x7_2']['conv']['kernel'].shape == (1, 7, 128, 128)
  assert variables['params']['fc']['kernel'].shape == (2048, 1008) and 'bias' not in variables['params']['fc']
  assert variables['batch_stats']['Mixed_7c']['branch_pool']['bn']['var'].shape == (192,)


@pytest.mark.parametrize('change, message', [
    (lambda sd: sd.pop('Mixed_6e.branch7x7dbl_3.bn.running_var'),
     r"missing key 'Mixed_6e.branch7x7dbl_3.bn.running_var' \(shape \(192,\)\)"),
    (lambda sd: sd.update({'Mixed_6b.branch7x7_2.conv.weight': np.zeros((128, 128, 7, 1), np.float32)}),
     r"key 'Mixed_6b.branch7x7_2.conv.weight' has shape \(128, 128, 7, 1\), expected \(128, 128, 1, 7\)"),
    (lambda sd: sd.update({'AuxLogits.fc.weight': np.zeros((1000, 768), np.float32)}),
     r"unexpected key 'AuxLogits.fc.weight' \(shape \(1000, 768\)\)"),
])
def test_state_dict_mismatch_names_the_key_and_shapes(change, message):
  state_dict = _zeros_state_dict()
  change(state_dict)
  with pytest.raises(ValueError, match=message) as e:
    inception.params_from_state_dict(state_dict, 'weights.pth')
  assert str(e.value).startswith('weights.pth: ') and inception.WEIGHTS_FILE in str(e.value)
  assert '\n' not in str(e.value)


def test_wrong_image_shape_is_a_value_error():
  with pytest.raises(ValueError, match=r'\[N, H, W, 1 or 3\].*\(2, 3, 32, 32\)'):
    inception.apply({}, np.zeros((2, 3, 32, 32), np.uint8))


# ---------------------------------------------------------------------------------------------------------------
# TensorFlow 1.x bilinear resize.


def test_resize_hand_example_has_no_half_pixel_offset_and_clamps_the_edge():
  # Sources 0, 0.5, 1, 1.5 of [0, 10]; half-pixel centres would give [0, 2.5, 7.5, 10], align_corners
  # [0, 3.33, 6.67, 10].
  row = np.array([0.0, 10.0], np.float32)
  np.testing.assert_allclose(inception.resize_bilinear_tf1(row.reshape(1, 1, 2, 1), 1, 4).ravel(), [0, 5, 10, 10])
  np.testing.assert_allclose(inception.resize_bilinear_tf1(row.reshape(1, 2, 1, 1), 4, 1).ravel(), [0, 5, 10, 10])


def test_resize_matches_the_per_pixel_formula():
  x = np.random.default_rng(0).uniform(0, 255, (2, 5, 7, 3)).astype(np.float32)
  height, width = 9, 4  # up in height, down in width
  expected = np.zeros((2, height, width, 3), np.float64)
  for i in range(height):
    for j in range(width):
      y, z = i * 5 / height, j * 7 / width
      y0, z0 = int(np.floor(y)), int(np.floor(z))
      y1, z1 = min(y0 + 1, 4), min(z0 + 1, 6)
      dy, dz = y - y0, z - z0
      expected[:, i, j] = ((1 - dy) * ((1 - dz) * x[:, y0, z0] + dz * x[:, y0, z1])
                           + dy * ((1 - dz) * x[:, y1, z0] + dz * x[:, y1, z1]))
  np.testing.assert_allclose(inception.resize_bilinear_tf1(x, height, width), expected, rtol=1e-5, atol=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# Parity with torch-fidelity 0.4.0 on random weights.


def _torch_fidelity_module(name):
  """torch_fidelity.<name>, imported without running the package __init__ (which imports torchvision)."""
  pytest.importorskip('torch')
  spec = importlib.util.find_spec('torch_fidelity')
  if spec is None:
    pytest.skip('torch-fidelity is not installed (pip install --no-deps torch-fidelity==0.4.0)')
  with pytest.MonkeyPatch.context() as patch:
    patch.setitem(sys.modules, 'torch_fidelity', importlib.util.module_from_spec(spec))  # __init__ not run
    return importlib.import_module(f'torch_fidelity.{name}')


def _random_state_dict(seed):
  """Realistic scales on the FID keys: He-normal weights, BN weight and running var ~ U(0.5, 1.5), others N(0, 0.1)."""
  rng = np.random.default_rng(seed)
  out = {}
  for key, shape in inception.state_dict_shapes().items():
    if key.endswith(('bn.weight', 'running_var')):
      out[key] = rng.uniform(0.5, 1.5, shape)
    elif key.endswith('.weight'):
      out[key] = rng.standard_normal(shape) * np.sqrt(2 / np.prod(shape[1:]))
    else:
      out[key] = 0.1 * rng.standard_normal(shape)
  return {k: v.astype(np.float32) for k, v in out.items()}


def _images(seed, shape):
  """Random uint8 images [N, H, W, 3]; image 0 is grey (equal channels)."""
  images = np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)
  images[0] = images[0, ..., :1]
  return images


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  """(loaded Inception, {image shape: (images, torch-fidelity pool, logits_unbiased)}) on random weights."""
  torch = pytest.importorskip('torch')
  fidelity = _torch_fidelity_module('feature_extractor_inceptionv3')
  directory = tmp_path_factory.mktemp('inception')
  torch.save({k: torch.from_numpy(v) for k, v in _random_state_dict(0).items()}, directory / 'random.pth')
  # Strict load_state_dict: torch-fidelity's module itself checks the key names and shapes.
  extractor = fidelity.FeatureExtractorInceptionV3('inception-v3-compat', ['2048', 'logits_unbiased'],
                                                   feature_extractor_weights_path=str(directory / 'random.pth'))
  # The file as a module's state_dict() is saved (num_batches_tracked included), in the legacy format of 2019.
  torch.save(extractor.state_dict(), directory / inception.WEIGHTS_FILE, _use_new_zipfile_serialization=False)
  outputs = {}
  for seed, shape in enumerate([(3, 32, 32, 3), (2, 48, 64, 3)]):
    images = _images(seed, shape)
    with torch.no_grad():
      pool, logits = extractor(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous())
    outputs[shape] = images, pool.numpy(), logits.numpy()
  return inception.load(directory / inception.WEIGHTS_FILE), outputs


def _assert_close(actual, expected):
  """Equal to 1e-4 of the largest magnitude (elementwise rtol is meaningless for ReLU features near zero)."""
  np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-4 * np.abs(expected).max())


@pytest.mark.parametrize('shape', [(3, 32, 32, 3), (2, 48, 64, 3)])
def test_pool_features_and_logits_match_torch_fidelity(reference, shape):
  model, outputs = reference
  images, pool, logits = outputs[shape]
  assert np.abs(pool).max() > 1e-2 and np.abs(logits).max() > 1e-2  # activations have not vanished
  out = jax.jit(inception.apply)(model.params, images)
  _assert_close(np.asarray(out['pool']), pool)
  _assert_close(np.asarray(out['logits']), logits)


def test_grey_float_images_are_repeated_to_rgb(reference):
  model, outputs = reference
  images, pool, _ = outputs[(3, 32, 32, 3)]
  features = model(images[:1, ..., :1].astype(np.float32))
  assert features.dtype == np.float32 and features.shape == (1, inception.FEATURES)
  _assert_close(features, pool[:1])


def test_resize_matches_torch_fidelity():
  torch = pytest.importorskip('torch')
  resize = _torch_fidelity_module('interpolate_compat_tensorflow').interpolate_bilinear_2d_like_tensorflow1x
  x = np.random.default_rng(1).uniform(0, 255, (2, 13, 17, 3)).astype(np.float32)
  expected = resize(torch.from_numpy(x).permute(0, 3, 1, 2), size=(299, 299), align_corners=False)
  np.testing.assert_allclose(inception.resize_bilinear_tf1(x, 299, 299), expected.permute(0, 2, 3, 1).numpy(),
                             rtol=0, atol=1e-4)
