"""PyTorch state dicts of diffusers and transformers models <-> Flax parameter trees: the one converter.

PyTorch names become Flax paths ('down_blocks.0' -> 'down_blocks_0'; the older attention names
'query/key/value/proj_attn' -> 'to_q/to_k/to_v/to_out_0'), conv kernels OIHW -> HWIO, linear weights transposed,
norm 'weight' -> 'scale'. Every network read from a diffusers or transformers folder (the AutoencoderKL, the
UNet2DConditionModel, the CLIP text towers) goes through it; no PyTorch is needed.
"""

import re

import flax
import numpy as np

_LEGACY_ATTENTION = {'query': 'to_q', 'key': 'to_k', 'value': 'to_v', 'proj_attn': 'to_out_0'}


def flax_path(torch_key: str) -> str:
  """'encoder.down_blocks.0.resnets.1.conv1.weight' -> 'encoder/down_blocks_0/resnets_1/conv1/weight'."""
  parts = []
  for part in torch_key.split('.'):
    if part.isdigit() and parts:
      parts[-1] += '_' + part
    else:
      parts.append(_LEGACY_ATTENTION.get(part, part))
  return '/'.join(parts)


def torch_key(path: str) -> str:
  """The inverse of flax_path for a Flax parameter path ('.../to_out_0/kernel' -> '....to_out.0.weight')."""
  parts = [re.sub(r'_(\d+)$', r'.\1', p) for p in path.split('/')]
  parts[-1] = {'kernel': 'weight', 'scale': 'weight'}.get(parts[-1], parts[-1])
  return '.'.join(parts)


def _to_flax(value: np.ndarray, leaf: str, expected: tuple) -> np.ndarray:
  """A PyTorch tensor in Flax layout: conv OIHW -> HWIO, linear [out, in] -> [in, out] (a 1x1 conv weight of the older
  attention blocks becomes a linear one), others unchanged."""
  if leaf == 'kernel' and value.ndim == 4 and len(expected) == 2:
    value = value[:, :, 0, 0] if value.shape[2:] == (1, 1) else value
  if leaf == 'kernel' and value.ndim == 4:
    return np.transpose(value, (2, 3, 1, 0))
  if leaf == 'kernel' and value.ndim == 2:
    return value.T
  return value


def from_diffusers(state_dict: dict, abstract_params, where: str):
  """Flax parameters from a diffusers state dict, checked leaf by leaf against `abstract_params` (shapes).

  Raises ValueError naming the first missing, unexpected or mis-shaped tensor (both shapes).
  """
  expected = flax.traverse_util.flatten_dict(abstract_params, sep='/')
  by_prefix = {}
  for key, value in state_dict.items():
    path = flax_path(key)
    prefix, leaf = path.rsplit('/', 1)
    if leaf == 'weight':
      leaf = 'scale' if f'{prefix}/scale' in expected else 'kernel'
    by_prefix[f'{prefix}/{leaf}'] = (key, np.asarray(value))
  unexpected = sorted(key for path, (key, _) in by_prefix.items() if path not in expected)
  if unexpected:
    raise ValueError(f'{where} has tensors this network does not have, e.g. {unexpected[:3]}: is its config.json '
                     'the one written with these weights?')
  params = {}
  for path, abstract in expected.items():
    if path not in by_prefix:
      raise ValueError(f'{where} lacks the tensor {torch_key(path)} (shape {tuple(abstract.shape)} in Flax layout).')
    key, value = by_prefix[path]
    converted = _to_flax(value, path.rsplit('/', 1)[1], tuple(abstract.shape))
    if converted.shape != tuple(abstract.shape):
      raise ValueError(f'{where}: tensor {key} has shape {value.shape} ({converted.shape} in Flax layout), but the '
                       f'network described by its config.json needs {tuple(abstract.shape)}.')
    params[path] = converted.astype(np.float32)
  return flax.traverse_util.unflatten_dict(params, sep='/')


def to_diffusers(params) -> dict:
  """The diffusers state dict of Flax parameters (the inverse of from_diffusers)."""
  out = {}
  for path, value in flax.traverse_util.flatten_dict(params, sep='/').items():
    value = np.asarray(value, np.float32)
    if path.endswith('/kernel'):
      value = np.transpose(value, (3, 2, 0, 1)) if value.ndim == 4 else value.T
    out[torch_key(path)] = np.ascontiguousarray(value)
  return out
