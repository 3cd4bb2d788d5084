"""LoRA adapters of a diffusers network <-> the safetensors files diffusers' `load_lora_weights` reads.

cm_jax's adapter of a kernel W [..., d_out] is {'a': A [..., r], 'b': B [r, d_out]} with W' = W + scale A B
(cm_jax.models.lora). The files hold, per PyTorch module `<prefix>.<module>` (prefix 'unet'), the PEFT layout
  dense: lora_A.weight [r, d_in] = A^T,             lora_B.weight [d_out, r] = B^T,
  conv:  lora_A.weight [r, c_in, kh, kw] (A OIHW),  lora_B.weight [d_out, r, 1, 1],
with W_torch' = W_torch + (alpha / r) lora_B lora_A. diffusers reads alpha only from the file's metadata entry
'lora_adapter_metadata' (a JSON of LoraConfig arguments, each key prefixed 'unet.'); without it, alpha = r (scale 1).

Read (`read_lora`) are also the older diffusers keys (`<module>.lora.down/up.weight`, the attention processors'
`to_q_lora.down.weight`, `lora_linear_layer`) and kohya's `lora_unet_<module with '_'>.lora_down/up.weight`, each
with an optional `<module>.alpha` scalar (alpha = r where it is absent), as diffusers converts them.
"""

import collections
import json
import re

from etils import epath
import flax
import numpy as np

from cm_jax.formats import diffusers as diffusers_format

LORA_WEIGHTS = 'pytorch_lora_weights.safetensors'  # the name load_lora_weights(folder) looks for
METADATA_KEY = 'lora_adapter_metadata'  # diffusers' safetensors metadata entry of LoraConfig arguments
UNET = 'unet'
_TEXT_PREFIXES = ('text_encoder.', 'text_encoder_2.', 'lora_te_', 'lora_te1_', 'lora_te2_')
_KOHYA_UNET = 'lora_unet_'
# Older diffusers spellings of a module's down / up matrices (diffusers' UNET_TO_DIFFUSERS, DIFFUSERS_OLD_TO_PEFT).
_ROLES = (('.lora_A.weight', 'down'), ('.lora_B.weight', 'up'), ('.lora.down.weight', 'down'),
          ('.lora.up.weight', 'up'), ('.lora_linear_layer.down.weight', 'down'),
          ('.lora_linear_layer.up.weight', 'up'), ('.lora_down.weight', 'down'), ('.lora_up.weight', 'up'),
          ('.alpha', 'alpha'))
_PROCESSOR = re.compile(r'\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$')


def module_name(kernel_path: str) -> str:
  """The PyTorch module of a Flax kernel path: 'down_blocks_0/attentions_0/.../to_out_0/kernel' -> '....to_out.0'."""
  return diffusers_format.torch_key(kernel_path).removesuffix('.weight')


def kernel_path(module: str) -> str:
  """The Flax kernel path of a PyTorch module name (the inverse of module_name)."""
  return diffusers_format.flax_path(module) + '/kernel'


def lora_file(path) -> epath.Path:
  """The LoRA file at `path`: the .safetensors itself, or LORA_WEIGHTS inside a folder."""
  path = epath.Path(path)
  if path.is_dir():
    path = path / LORA_WEIGHTS
  if not path.exists():
    raise FileNotFoundError(f'{path} does not exist: a diffusers LoRA is a {LORA_WEIGHTS} (save_lora_weights) or the '
                            'folder holding it.')
  return path


# ----------------------------------------------------------------------------------------------------------
# Export.
# ----------------------------------------------------------------------------------------------------------
def _flat_adapters(adapters) -> dict:
  return flax.traverse_util.flatten_dict(
      adapters, sep='/', is_leaf=lambda _, v: isinstance(v, dict) and set(v) == {'a', 'b'})


def to_peft(adapters, scale: float, prefix: str = UNET) -> tuple[dict, dict]:
  """(state dict, LoraConfig arguments) of cm_jax adapters with update scale A B: the PEFT tensors of each module,
  r = the most common rank, lora_alpha = scale r, and rank_pattern / alpha_pattern for modules of other ranks (so
  alpha_m / r_m = scale everywhere)."""
  state_dict, ranks = {}, {}
  for path, adapter in sorted(_flat_adapters(adapters).items()):
    a, b = (np.asarray(adapter[k], np.float32) for k in ('a', 'b'))
    if not path.endswith('/kernel') or a.ndim not in (2, 4) or b.ndim != 2 or a.shape[-1] != b.shape[0]:
      raise ValueError(f'The adapter of {path} (a {a.shape}, b {b.shape}) is not a dense or 2-d conv LoRA '
                       '(a [d_in, r] or [kh, kw, c_in, r], b [r, d_out]).')
    module = module_name(path)
    lora_a = a.T if a.ndim == 2 else np.transpose(a, (3, 2, 0, 1))
    lora_b = b.T if a.ndim == 2 else b.T[:, :, None, None]
    state_dict[f'{prefix}.{module}.lora_A.weight'] = np.ascontiguousarray(lora_a)
    state_dict[f'{prefix}.{module}.lora_B.weight'] = np.ascontiguousarray(lora_b)
    ranks[module] = b.shape[0]
  if not ranks:
    raise ValueError('There are no adapters to export.')
  r = collections.Counter(ranks.values()).most_common()[0][0]
  others = {f'^{re.escape(m)}': rank for m, rank in ranks.items() if rank != r}  # peft matches these as regexes
  config = dict(r=int(r), lora_alpha=float(scale) * r, target_modules=sorted(ranks),
                rank_pattern=others, alpha_pattern={k: float(scale) * v for k, v in others.items()},
                use_rslora=False, use_dora=False, lora_bias=False, init_lora_weights=True, bias='none')
  return state_dict, config


def write_lora(path, adapters, scale: float, prefix: str = UNET) -> epath.Path:
  """Writes cm_jax adapters (update scale A B) as the LoRA file diffusers' `pipe.load_lora_weights` reads.

  Args:
    path: a folder (LORA_WEIGHTS is written inside it) or a file name ending in .safetensors.
    adapters: {kernel path...: {'a': A, 'b': B}} of the `prefix` network (cm_jax.models.lora.init's tree).
    scale: the adapters' alpha / r (LoRAParams.scale); recorded as lora_alpha = scale r in the file's metadata.
    prefix: the pipeline component the adapters belong to ('unet').

  Returns:
    The file written.
  """
  from safetensors import numpy as safetensors_numpy  # pylint: disable=g-import-not-at-top
  path = epath.Path(path)
  if not path.name.endswith('.safetensors'):
    path.mkdir(parents=True, exist_ok=True)
    path = path / LORA_WEIGHTS
  state_dict, config = to_peft(adapters, scale, prefix)
  metadata = {'format': 'pt', METADATA_KEY: json.dumps({f'{prefix}.{k}': v for k, v in config.items()}, indent=2,
                                                       sort_keys=True)}
  safetensors_numpy.save_file(state_dict, str(path), metadata=metadata)
  return path


# ----------------------------------------------------------------------------------------------------------
# Import.
# ----------------------------------------------------------------------------------------------------------
def _pattern_value(patterns: dict, module: str, default):
  """peft's get_pattern_key: the value of the first pattern p with re.match('(.*\\.)?(p)$', module)."""
  for pattern, value in patterns.items():
    if re.match(rf'(.*\.)?({pattern})$', module):
      return value
  return default


def _split(key: str, prefix: str, kohya_names: dict) -> tuple[str, str] | None:
  """(module, 'down' | 'up' | 'alpha') of a file key of the `prefix` network; None if the key is of another one."""
  if key.startswith(_TEXT_PREFIXES):
    return None
  key = _PROCESSOR.sub(r'.\1.lora.\2.weight', key).replace('.to_out.lora.', '.to_out.0.lora.')
  for suffix, role in _ROLES:
    if key.endswith(suffix):
      name = key.removesuffix(suffix)
      break
  else:
    raise ValueError(f'The LoRA key {key} is none of lora_A/lora_B.weight, lora.down/up.weight, '
                     'lora_down/up.weight, alpha; cm_jax reads LoRA adapters (not DoRA, LoKr or LoHa).')
  if name.startswith(_KOHYA_UNET):
    flat = name.removeprefix(_KOHYA_UNET)
    return (module_name(kohya_names[flat]) if flat in kohya_names else flat), role
  return name.removeprefix(prefix + '.'), role


def from_peft(state_dict: dict, params, where: str, metadata: dict | None = None, prefix: str = UNET,
              skip_text_encoder: bool = False):
  """(adapters, scale) of a diffusers-format LoRA state dict for the network of Flax `params`: the cm_jax adapters
  (A [..., r], B [r, d_out]) and one scale, with each module's own alpha_m / r_m / scale folded into its B.

  Args:
    state_dict: the file's tensors (PEFT, older diffusers or kohya keys).
    params: the network's parameters (their kernels' shapes are checked).
    where: the file, for errors.
    metadata: diffusers' 'lora_adapter_metadata' (LoraConfig arguments with `prefix.` keys), or None.
    skip_text_encoder: drop text-encoder keys (else they are an error: cm_jax merges UNet LoRAs only).

  Raises:
    ValueError: a key of a module the network lacks (the first, named), a mis-shaped or half pair, DoRA.
  """
  kernels = {p: np.shape(v) for p, v in flax.traverse_util.flatten_dict(params, sep='/').items()
             if p.endswith('/kernel')}
  kohya_names = {p.removesuffix('/kernel').replace('/', '_'): p for p in kernels}
  found = collections.defaultdict(dict)
  for key in sorted(state_dict):
    parts = _split(key, prefix, kohya_names)
    if parts is None:
      if skip_text_encoder:
        continue
      raise ValueError(f'{where} holds a text-encoder LoRA ({key}); cm_jax merges UNet LoRAs only: pass '
                       'skip_text_encoder=True to read its UNet part.')
    module, role = parts
    path = kernel_path(module)
    if path not in kernels:
      raise ValueError(f'{where}: the LoRA key {key} names a module ({module}) this UNet does not have: is the LoRA '
                       'for another network?')
    found[path][role] = (key, np.asarray(state_dict[key], np.float32))
  if not found:
    raise ValueError(f'{where} holds no LoRA tensors of the {prefix}.')
  config = {k.removeprefix(prefix + '.'): v for k, v in (metadata or {}).items() if k.startswith(prefix + '.')}
  if config.get('use_dora'):
    raise ValueError(f'{where} is a DoRA adapter; cm_jax reads plain LoRA.')
  if config.get('lora_bias'):
    raise ValueError(f'{where} has LoRA biases (lora_bias=True); cm_jax reads bias-free LoRA.')
  adapters, scales = {}, {}
  for path, roles in found.items():
    a, up, rank = _pair(where, path, roles, kernels[path])
    if config:  # diffusers' reading: LoraConfig(**metadata), lora_alpha defaulting to peft's 8
      alpha = float(_pattern_value(config.get('alpha_pattern') or {}, module_name(path), config.get('lora_alpha', 8)))
    else:
      alpha = float(roles['alpha'][1]) if 'alpha' in roles else float(rank)
    scales[path] = alpha / (np.sqrt(rank) if config.get('use_rslora') else rank)
    adapters[path] = {'a': a, 'b': up.T}
  scale = collections.Counter(scales.values()).most_common()[0][0]
  for path, adapter in adapters.items():
    if scales[path] != scale:
      adapter['b'] = adapter['b'] * np.float32(scales[path] / scale)
  return flax.traverse_util.unflatten_dict({tuple(p.split('/')): v for p, v in adapters.items()}), float(scale)


def _pair(where: str, path: str, roles: dict, shape: tuple):
  """(A [..., r], up [d_out, r], r) of one module's down / up tensors (linear or conv, torch layouts) for the Flax
  kernel of `shape` at `path`.

  Raises:
    ValueError: a half pair, or tensors that do not fit the kernel (both shapes named).
  """
  if 'down' not in roles or 'up' not in roles:
    key = next(iter(roles.values()))[0]
    raise ValueError(f'{where}: {key} has no {"up" if "down" in roles else "down"} matrix beside it.')
  (down_key, down), (up_key, up) = roles['down'], roles['up']
  if len(shape) == 2 and down.ndim == 4 and down.shape[2:] == (1, 1):  # a 1x1 conv LoRA on a linear layer
    down = down[:, :, 0, 0]
  if up.ndim == 4:
    if up.shape[2:] != (1, 1):
      raise ValueError(f'{where}: {up_key} has shape {up.shape}; a conv LoRA\'s up matrix is 1x1.')
    up = up[:, :, 0, 0]
  a = down.T if down.ndim == 2 else np.transpose(down, (2, 3, 1, 0)) if down.ndim == 4 else down
  rank = up.shape[-1] if up.ndim == 2 else -1
  if (up.ndim != 2 or a.ndim != len(shape) or a.shape[:-1] != shape[:-1] or a.shape[-1] != rank
      or up.shape[0] != shape[-1]):
    raise ValueError(f'{where}: {down_key} {down.shape} and {up_key} {up.shape} do not fit the kernel '
                     f'{module_name(path)} (Flax shape {shape}).')
  return a, up, rank


def read_lora(path, params, prefix: str = UNET, skip_text_encoder: bool = False):
  """(adapters, scale) of a diffusers-format LoRA file for the network of `params`, for cm_jax.models.lora.merge:
  merge(params, (adapters, weight * scale)).

  Args:
    path: the .safetensors, or a folder holding LORA_WEIGHTS.
    params, prefix, skip_text_encoder: as from_peft.
  """
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  path = lora_file(path)
  try:
    with safe_open(str(path), framework='np') as f:
      state_dict = {k: f.get_tensor(k) for k in f.keys()}
      header = f.metadata() or {}
  except Exception as e:  # the safetensors reader raises its own error type on a truncated or garbage file
    raise ValueError(f'{path} is not a readable safetensors file ({e}).') from e
  metadata = None
  if header.get(METADATA_KEY):
    try:
      metadata = json.loads(header[METADATA_KEY])
    except json.JSONDecodeError as e:
      raise ValueError(f'{path}: its {METADATA_KEY} metadata is not JSON: {e}') from e
  return from_peft(state_dict, params, str(path), metadata, prefix, skip_text_encoder)
