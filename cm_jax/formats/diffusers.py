"""PyTorch state dicts of diffusers and transformers models <-> Flax parameter trees: the one converter.

PyTorch names become Flax paths ('down_blocks.0' -> 'down_blocks_0'; the older attention names
'query/key/value/proj_attn' -> 'to_q/to_k/to_v/to_out_0'), conv kernels OIHW -> HWIO, linear weights transposed,
norm 'weight' -> 'scale'. Every network read from a diffusers or transformers folder (the AutoencoderKL, the
UNet2DConditionModel, the CLIP text towers) goes through it; no PyTorch is needed.
"""

import json
import re
import shutil
from typing import Optional

from etils import epath
import flax
import numpy as np

CONFIG_FILE = 'config.json'
DIFFUSERS_STEM = 'diffusion_pytorch_model'  # diffusers' weights: <stem>.safetensors
TRANSFORMERS_STEM = 'model'  # transformers' weights
_LEGACY_ATTENTION = {'query': 'to_q', 'key': 'to_k', 'value': 'to_v', 'proj_attn': 'to_out_0'}
# Layer names of diffusers whose '_<digit>' is part of the name, not a list index (TimestepEmbedding's two layers).
_NAMED_WITH_DIGIT = ('linear_1', 'linear_2')


def read_json(path) -> dict:
  """The object of a JSON file (a config.json, model_index.json, a scheduler config); errors name the file."""
  path = epath.Path(path)
  if not path.exists():
    raise FileNotFoundError(f'{path} does not exist.')
  try:
    return json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f'{path} is not valid JSON: {e}') from e


def _read_safetensors(path) -> dict:
  from safetensors import numpy as safetensors_numpy  # pylint: disable=g-import-not-at-top
  try:
    return safetensors_numpy.load_file(str(path))
  except Exception as e:  # the safetensors reader raises its own error type on a truncated or garbage file
    raise ValueError(f'{path} is not a readable safetensors file ({e}); download or export it again.') from e


def read_weights(folder, stem: str) -> tuple[dict, str]:
  """(state dict, where it was read) of a diffusers / transformers model folder: `<stem>.safetensors`, its fp16
  variant, or the shards a `<stem>.safetensors.index.json` (or fp16 index) weight_map names.

  `stem` is 'diffusion_pytorch_model' for diffusers models, 'model' for transformers ones.
  """
  folder = epath.Path(folder)
  singles = (f'{stem}.safetensors', f'{stem}.fp16.safetensors')
  indexes = (f'{stem}.safetensors.index.json', f'{stem}.safetensors.index.fp16.json',
             f'{stem}.fp16.safetensors.index.json')
  for name in singles:
    if (folder / name).exists():
      return _read_safetensors(folder / name), str(folder / name)
  for name in indexes:
    if (folder / name).exists():
      weight_map = read_json(folder / name).get('weight_map')
      if not isinstance(weight_map, dict):
        raise ValueError(f'{folder / name} is not a safetensors index: it has no weight_map.')
      state_dict = {}
      for shard in sorted(set(weight_map.values())):
        if not (folder / shard).exists():
          raise FileNotFoundError(f'{folder / shard}, a shard {folder / name} names, does not exist.')
        state_dict.update(_read_safetensors(folder / shard))
      return state_dict, str(folder / name)
  raise FileNotFoundError(f'{folder} holds none of {list(singles + indexes)}: save_pretrained(..., '
                          'safe_serialization=True) writes them.')


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
  parts = [p if p in _NAMED_WITH_DIGIT else re.sub(r'_(\d+)$', r'.\1', p) for p in path.split('/')]
  parts[-1] = {'kernel': 'weight', 'scale': 'weight', 'embedding': 'weight'}.get(parts[-1], parts[-1])
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
    if leaf == 'weight':  # a norm's scale, an embedding table (nn.Embed) or a kernel
      leaf = next((name for name in ('scale', 'embedding') if f'{prefix}/{name}' in expected), 'kernel')
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


def write_model(folder, params, config: dict, stem: str = DIFFUSERS_STEM) -> None:
  """A diffusers (or, with stem TRANSFORMERS_STEM, transformers) model folder of Flax `params`: the safetensors
  first, config.json last (a folder with a config holds its whole model)."""
  from safetensors import numpy as safetensors_numpy  # pylint: disable=g-import-not-at-top
  folder = epath.Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  safetensors_numpy.save_file(to_diffusers(params), str(folder / f'{stem}.safetensors'), metadata={'format': 'pt'})
  (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2))


PIPELINE_INDEX = 'model_index.json'
SCHEDULER_CONFIG = 'scheduler/scheduler_config.json'


def write_pipeline(folder, source, unet_params, unet_config: dict, scheduler_config: Optional[dict] = None) -> None:
  """A diffusers pipeline folder: the `source` pipeline's components with a new unet/ (and, given, a new scheduler
  config), model_index.json last. Written beside `folder` and renamed into place, so a folder that exists holds a
  whole pipeline (`folder` must not exist)."""
  folder, source = epath.Path(folder), epath.Path(source)
  staging = folder.parent / f'.{folder.name}.partial'
  if staging.exists():
    shutil.rmtree(staging)  # an interrupted export
  index = read_json(source / PIPELINE_INDEX)
  for name, spec in index.items():
    if name.startswith('_') or not isinstance(spec, list) or spec[0] is None or name in ('unet', 'scheduler'):
      continue
    shutil.copytree(source / name, staging / name)
  write_model(staging / 'unet', unet_params, unet_config)
  scheduler = scheduler_config or read_json(source / SCHEDULER_CONFIG)
  (staging / 'scheduler').mkdir(parents=True)
  (staging / SCHEDULER_CONFIG).write_text(json.dumps(scheduler, indent=2))
  index['scheduler'] = ['diffusers', scheduler['_class_name']]
  (staging / PIPELINE_INDEX).write_text(json.dumps(index, indent=2))
  staging.rename(folder)
