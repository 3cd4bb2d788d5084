"""LPIPS (Zhang et al. 2018) on VGG-16 features: the perceptual distance of CM's CD-LPIPS and CT-LPIPS.

d(x, y) = sum_l mean_hw sum_c w_lc (n_l(x) - n_l(y))^2, n_l = channel-unit-normalised relu{l}_{last} features of
VGG-16 at stages l = 1..5, w_l >= 0 the linear heads. Images [B, H, W, 3] in [-1, 1] smaller than 256 pixels are
first resized to 224x224 bilinearly, as the CM code does, then shifted and scaled as LPIPS expects.

Weights file (config.objective.lpips_weights, read by the trainer before it compiles the step): an .npz whose keys are the '/'-joined Flax
parameter paths of `LPIPS` -- `conv{s}_{j}/kernel` [3, 3, in, out] and `conv{s}_{j}/bias` [out] for the thirteen
VGG-16 convolutions (conv1_1 .. conv5_3), and `lin{l}/kernel` [C_l, 1] for the five heads (lin0 .. lin4). From the
PyTorch LPIPS v0.1 release: kernel = torchvision vgg16 features weight.transpose(2, 3, 1, 0), lin kernel =
lin{l}.model.1.weight.reshape(C_l, 1). `save_params` writes this format.
"""

from collections.abc import Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

VGG16_WIDTHS = (64, 128, 256, 512, 512)
VGG16_DEPTHS = (2, 2, 3, 3, 3)
RESIZE = 224
_SHIFT = np.array([-0.030, -0.088, -0.188], np.float32)
_SCALE = np.array([0.458, 0.448, 0.450], np.float32)


class LPIPS(nn.Module):
  """Per-sample LPIPS of two image batches [B, H, W, 3] in [-1, 1] (no resizing here) -> [B]."""
  widths: Sequence[int] = VGG16_WIDTHS
  depths: Sequence[int] = VGG16_DEPTHS

  @nn.compact
  def __call__(self, x, y):
    """Runs VGG-16 on [x; y] once and sums the heads' weighted squared feature differences."""
    h = (jnp.concatenate([x, y]) - _SHIFT) / _SCALE
    total = 0.0
    for s, (width, depth) in enumerate(zip(self.widths, self.depths)):
      if s:
        h = nn.max_pool(h, (2, 2), strides=(2, 2))
      for j in range(depth):
        h = nn.relu(nn.Conv(width, (3, 3), name=f'conv{s + 1}_{j + 1}')(h))
      n = h / (jnp.sqrt(jnp.sum(h**2, axis=-1, keepdims=True)) + 1e-10)
      nx, ny = jnp.split(n, 2)
      head = nn.Dense(1, use_bias=False, name=f'lin{s}')((nx - ny) ** 2)
      total = total + jnp.mean(head, axis=(1, 2, 3))
    return total


def resize(x):
  """Bilinear resize of images smaller than 256 pixels to RESIZE x RESIZE (the CM code's LPIPS input)."""
  if x.shape[1] >= 256:
    return x
  return jax.image.resize(x, (x.shape[0], RESIZE, RESIZE, x.shape[-1]), method='bilinear')


def expected_shapes(model=None):
  """{'/'-joined path: shape} of the model's parameters, from abstract shapes only."""
  model = model or LPIPS()
  x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  params = jax.eval_shape(model.init, jax.random.key(0), x, x)['params']
  return {k: tuple(v.shape) for k, v in flax.traverse_util.flatten_dict(params, sep='/').items()}


def save_params(params, path):
  """Writes LPIPS parameters in the documented .npz format."""
  flat = flax.traverse_util.flatten_dict(jax.device_get(params), sep='/')
  with epath.Path(path).open('wb') as f:
    np.savez(f, **{k: np.asarray(v, np.float32) for k, v in flat.items()})


def load_params(path, model=None):
  """Reads and checks an LPIPS weights file (every expected key with its shape, nothing else) into host arrays."""
  path = epath.Path(path)
  if not str(path) or not path.is_file():
    raise FileNotFoundError(
        f'LPIPS weights not found at {str(path)!r} (config.objective.lpips_weights). Expected an .npz of VGG-16 '
        'and linear-head weights in the format described in cm_jax/lpips.py.')
  with path.open('rb') as f:
    arrays = dict(np.load(f))
  expected = expected_shapes(model)
  problems = [f'missing {k}' for k in sorted(set(expected) - set(arrays))]
  problems += [f'unexpected {k}' for k in sorted(set(arrays) - set(expected))]
  problems += [f'{k} has shape {arrays[k].shape}, expected {s}' for k, s in expected.items()
               if k in arrays and arrays[k].shape != s]
  if problems:
    raise ValueError(f'LPIPS weights file {str(path)!r} does not match cm_jax.lpips.LPIPS: ' + '; '.join(problems))
  return flax.traverse_util.unflatten_dict({k: v.astype(np.float32) for k, v in arrays.items()}, sep='/')


def lpips_distance(model: LPIPS = LPIPS()):
  """d(x, y, params) [B, H, W, 3] x2 -> [B]: LPIPS after the 224 resize, with the network's weights as an argument
  (a train step input, like the teacher: not a constant of the compiled program)."""

  def distance(x, y, params):
    if x.shape[-1] != 3:
      raise ValueError(f'LPIPS needs RGB images [B, H, W, 3]; got shape {x.shape}.')
    return model.apply({'params': params}, resize(x), resize(y))

  return distance
