"""Inception-v3 of FID and the Inception Score: the 2015-12-05 TensorFlow graph, in Flax, with its PyTorch weights.

The network is the one of the standard FID weights file `pt_inception-2015-12-05-6726825d.pth` (the TensorFlow
graph as ported by pytorch-fid and torch-fidelity), which differs from torchvision's Inception-v3: the average-pool
branches of the A, C and first E blocks do not count the zero padding, the last E block pools with a 3x3 max pool,
and batch norm uses eps = 1e-3. Images (uint8 or float in [0, 255], NHWC, any size; 1 channel is repeated to 3) are
resized to 299x299 with TensorFlow 1.x bilinear resizing (align_corners=False: source = target * in / out, no
half-pixel offset), mapped to (x - 128) / 128, and give the 2048-d global-average-pool features (FID) and the
1008-way logits without the fc bias (torch-fidelity's 'logits_unbiased', the Inception Score's input).

Weights: the PyTorch state dict is read without torch (`torch_pickle`); conv weights [O, I, kh, kw] become Flax
kernels [kh, kw, I, O], bn.weight/bias/running_mean/running_var become scale/bias/mean/var, fc.weight [1008, 2048]
becomes the kernel [2048, 1008]; fc.bias is checked and dropped, num_batches_tracked is ignored when present.
"""

import functools

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cm_jax.evaluation import torch_pickle

FEATURES = 2048
NUM_LOGITS = 1008
RESOLUTION = 299
WEIGHTS_FILE = 'pt_inception-2015-12-05-6726825d.pth'
WEIGHTS_URL = f'https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{WEIGHTS_FILE}'
_PRECISION = jax.lax.Precision.HIGHEST  # FID is sensitive to feature precision: no bf16/tf32 passes on TPU/GPU.


class ConvBN(nn.Module):
  """Conv (no bias) -> batch norm with running statistics (eps 1e-3) -> ReLU."""
  features: int
  kernel: tuple[int, int]
  stride: int = 1
  padding: str = 'SAME'

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(self.features, self.kernel, self.stride, self.padding, use_bias=False, precision=_PRECISION,
                name='conv')(x)
    return nn.relu(nn.BatchNorm(use_running_average=True, epsilon=1e-3, name='bn')(x))


def _branch(x, *layers):
  """Applies ConvBN layers given as (name, features, kernel[, stride, padding]) in sequence."""
  for name, features, kernel, *rest in layers:
    x = ConvBN(features, kernel, *rest, name=name)(x)
  return x


def _avg_pool(x):
  """3x3 stride-1 average pool over the window's in-image pixels only (TensorFlow's padding rule)."""
  return nn.avg_pool(x, (3, 3), padding='SAME', count_include_pad=False)


def _max_pool_2(x):
  """3x3 stride-2 max pool without padding (the grid reductions)."""
  return nn.max_pool(x, (3, 3), strides=(2, 2))


class InceptionA(nn.Module):
  """35x35 block: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avg pool-1x1 branches."""
  pool_features: int

  @nn.compact
  def __call__(self, x):
    return jnp.concatenate([
        _branch(x, ('branch1x1', 64, (1, 1))),
        _branch(x, ('branch5x5_1', 48, (1, 1)), ('branch5x5_2', 64, (5, 5))),
        _branch(x, ('branch3x3dbl_1', 64, (1, 1)), ('branch3x3dbl_2', 96, (3, 3)), ('branch3x3dbl_3', 96, (3, 3))),
        _branch(_avg_pool(x), ('branch_pool', self.pool_features, (1, 1))),
    ], axis=-1)


class InceptionB(nn.Module):
  """35 -> 17 reduction: 3x3/2 | 1x1-3x3-3x3/2 | max pool 3x3/2."""

  @nn.compact
  def __call__(self, x):
    return jnp.concatenate([
        _branch(x, ('branch3x3', 384, (3, 3), 2, 'VALID')),
        _branch(x, ('branch3x3dbl_1', 64, (1, 1)), ('branch3x3dbl_2', 96, (3, 3)),
                ('branch3x3dbl_3', 96, (3, 3), 2, 'VALID')),
        _max_pool_2(x),
    ], axis=-1)


class InceptionC(nn.Module):
  """17x17 block with factorised 7x7 convolutions (c7 inner channels)."""
  c7: int

  @nn.compact
  def __call__(self, x):
    c7 = self.c7
    return jnp.concatenate([
        _branch(x, ('branch1x1', 192, (1, 1))),
        _branch(x, ('branch7x7_1', c7, (1, 1)), ('branch7x7_2', c7, (1, 7)), ('branch7x7_3', 192, (7, 1))),
        _branch(x, ('branch7x7dbl_1', c7, (1, 1)), ('branch7x7dbl_2', c7, (7, 1)), ('branch7x7dbl_3', c7, (1, 7)),
                ('branch7x7dbl_4', c7, (7, 1)), ('branch7x7dbl_5', 192, (1, 7))),
        _branch(_avg_pool(x), ('branch_pool', 192, (1, 1))),
    ], axis=-1)


class InceptionD(nn.Module):
  """17 -> 8 reduction: 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | max pool 3x3/2."""

  @nn.compact
  def __call__(self, x):
    return jnp.concatenate([
        _branch(x, ('branch3x3_1', 192, (1, 1)), ('branch3x3_2', 320, (3, 3), 2, 'VALID')),
        _branch(x, ('branch7x7x3_1', 192, (1, 1)), ('branch7x7x3_2', 192, (1, 7)), ('branch7x7x3_3', 192, (7, 1)),
                ('branch7x7x3_4', 192, (3, 3), 2, 'VALID')),
        _max_pool_2(x),
    ], axis=-1)


class InceptionE(nn.Module):
  """8x8 block with split 1x3/3x1 outputs; the pool branch averages (Mixed_7b) or, in the FID graph, maxes (7c)."""
  max_pool: bool

  @nn.compact
  def __call__(self, x):
    b3 = _branch(x, ('branch3x3_1', 384, (1, 1)))
    bd = _branch(x, ('branch3x3dbl_1', 448, (1, 1)), ('branch3x3dbl_2', 384, (3, 3)))
    pooled = nn.max_pool(x, (3, 3), padding='SAME') if self.max_pool else _avg_pool(x)
    return jnp.concatenate([
        _branch(x, ('branch1x1', 320, (1, 1))),
        _branch(b3, ('branch3x3_2a', 384, (1, 3))), _branch(b3, ('branch3x3_2b', 384, (3, 1))),
        _branch(bd, ('branch3x3dbl_3a', 384, (1, 3))), _branch(bd, ('branch3x3dbl_3b', 384, (3, 1))),
        _branch(pooled, ('branch_pool', 192, (1, 1))),
    ], axis=-1)


class InceptionV3(nn.Module):
  """Normalised images [N, 299, 299, 3] -> (pool features [N, 2048], logits without bias [N, 1008])."""

  @nn.compact
  def __call__(self, x):
    x = _branch(x, ('Conv2d_1a_3x3', 32, (3, 3), 2, 'VALID'), ('Conv2d_2a_3x3', 32, (3, 3), 1, 'VALID'),
                ('Conv2d_2b_3x3', 64, (3, 3)))
    x = _branch(_max_pool_2(x), ('Conv2d_3b_1x1', 80, (1, 1)), ('Conv2d_4a_3x3', 192, (3, 3), 1, 'VALID'))
    x = _max_pool_2(x)
    for name, pool_features in (('Mixed_5b', 32), ('Mixed_5c', 64), ('Mixed_5d', 64)):
      x = InceptionA(pool_features, name=name)(x)
    x = InceptionB(name='Mixed_6a')(x)
    for name, c7 in (('Mixed_6b', 128), ('Mixed_6c', 160), ('Mixed_6d', 160), ('Mixed_6e', 192)):
      x = InceptionC(c7, name=name)(x)
    x = InceptionD(name='Mixed_7a')(x)
    x = InceptionE(max_pool=False, name='Mixed_7b')(x)
    x = InceptionE(max_pool=True, name='Mixed_7c')(x)
    pool = jnp.mean(x, axis=(1, 2))
    return pool, nn.Dense(NUM_LOGITS, use_bias=False, precision=_PRECISION, name='fc')(pool)


def _resize_axis_tf1(x, axis: int, size: int):
  """Linear interpolation along `axis` at sources i * n / size (i < size), the upper neighbour clamped to n - 1."""
  n = x.shape[axis]
  source = np.arange(size, dtype=np.float32) * np.float32(n / size)
  lower = np.floor(source).astype(np.int32)
  frac = (source - lower).reshape([size] + [1] * (x.ndim - 1 - axis))
  a, b = jnp.take(x, lower, axis=axis), jnp.take(x, np.minimum(lower + 1, n - 1), axis=axis)
  return a + (b - a) * frac


def resize_bilinear_tf1(images, height: int, width: int):
  """TensorFlow 1.x bilinear resize (align_corners=False) of float images [N, H, W, C] to [N, height, width, C]."""
  return _resize_axis_tf1(_resize_axis_tf1(images, 2, width), 1, height)


def apply(params, images) -> dict:
  """{'pool': float32 [N, 2048], 'logits': float32 [N, 1008]} of images [N, H, W, 1 or 3] in [0, 255] (jittable).

  Args:
    params: the InceptionV3 variables, `Inception.params` of `load`.
    images: uint8, or float in [0, 255], NHWC of any height and width; resized to 299x299 here.
  """
  x = jnp.asarray(images, jnp.float32)
  if x.ndim != 4 or x.shape[-1] not in (1, 3):
    raise ValueError(f'Inception needs images [N, H, W, 1 or 3] (NHWC); got shape {x.shape}.')
  x = resize_bilinear_tf1(jnp.broadcast_to(x, (*x.shape[:3], 3)), RESOLUTION, RESOLUTION)
  pool, logits = InceptionV3().apply(params, (x - 128) / 128)
  return {'pool': pool, 'logits': logits}


_apply_jit = jax.jit(apply)


@functools.cache
def _abstract_variables() -> dict:
  """{flat Flax path: shape} of InceptionV3's variables ('params' and 'batch_stats'), from abstract shapes."""
  x = jax.ShapeDtypeStruct((1, RESOLUTION, RESOLUTION, 3), jnp.float32)
  variables = jax.eval_shape(InceptionV3().init, jax.random.key(0), x)
  return {path: tuple(v.shape) for path, v in flax.traverse_util.flatten_dict(variables).items()}


_TORCH_LEAF = {'kernel': 'weight', 'scale': 'weight', 'bias': 'bias', 'mean': 'running_mean', 'var': 'running_var'}


def _torch_key(path) -> str:
  """'Mixed_5b.branch1x1.conv.weight' for ('params', 'Mixed_5b', 'branch1x1', 'conv', 'kernel'), and so on."""
  return '.'.join([*path[1:-1], _TORCH_LEAF[path[-1]]])


def _torch_shape(path, shape) -> tuple:
  """Flax kernels [kh, kw, I, O] / [I, O] are torch weights [O, I, kh, kw] / [O, I]; other shapes are shared."""
  return (shape[-1], shape[-2], *shape[:-2]) if path[-1] == 'kernel' else shape


def state_dict_shapes() -> dict[str, tuple]:
  """{key: shape} of the FID Inception state dict, every key required (num_batches_tracked, optional, excluded)."""
  shapes = {_torch_key(path): _torch_shape(path, shape) for path, shape in _abstract_variables().items()}
  return {**shapes, 'fc.bias': (NUM_LOGITS,)}


def params_from_state_dict(state_dict, source: str = 'state dict') -> dict:
  """Checks a {key: array} state dict against state_dict_shapes() and maps it to InceptionV3 variables.

  Raises:
    ValueError: one line naming `source`, the first missing, unexpected or misshapen key and the shapes.
  """
  shapes = state_dict_shapes()
  hint = f'expected the FID Inception-v3 weights {WEIGHTS_FILE} ({WEIGHTS_URL})'
  for key, shape in shapes.items():
    if key not in state_dict:
      raise ValueError(f'{source}: missing key {key!r} (shape {shape}); {hint}.')
    if tuple(state_dict[key].shape) != shape:
      raise ValueError(f'{source}: key {key!r} has shape {tuple(state_dict[key].shape)}, expected {shape}; {hint}.')
  optional = {k.replace('.running_mean', '.num_batches_tracked') for k in shapes if k.endswith('.running_mean')}
  for key, value in state_dict.items():
    if key not in shapes and key not in optional:
      raise ValueError(f'{source}: unexpected key {key!r} (shape {tuple(value.shape)}); {hint}.')

  def convert(path):
    value = np.asarray(state_dict[_torch_key(path)], np.float32)
    return value.transpose(*range(2, value.ndim), 1, 0) if path[-1] == 'kernel' else value

  return flax.traverse_util.unflatten_dict({path: convert(path) for path in _abstract_variables()})


class Inception:
  """The FID Inception-v3 with weights: `inception(images)` gives pool features np.float32 [N, 2048].

  Attributes:
    params: the InceptionV3 variables {'params': ..., 'batch_stats': ...} on the default device, for `apply`.
  """

  def __init__(self, params):
    self.params = params

  def __call__(self, images) -> np.ndarray:
    """Pool features [N, 2048] of images [N, H, W, 1 or 3] (uint8, or float in [0, 255])."""
    return np.asarray(_apply_jit(self.params, images)['pool'], np.float32)


def load(path) -> Inception:
  """Reads the FID Inception weights (a PyTorch state dict .pth, zip or legacy format) without torch.

  Raises:
    FileNotFoundError: nothing at `path`; the message names WEIGHTS_FILE and where to download it.
    ValueError: not a readable torch pickle, or a key missing, unexpected or of the wrong shape (one line).
  """
  try:
    state_dict = torch_pickle.load_state_dict(path)
  except FileNotFoundError:
    raise FileNotFoundError(f'No Inception weights at {path}: expected {WEIGHTS_FILE}, downloadable from '
                            f'{WEIGHTS_URL}.') from None
  return Inception(jax.device_put(params_from_state_dict(state_dict, str(path))))
