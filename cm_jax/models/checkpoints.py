"""Released networks of other projects read into cm_jax networks: EDM's network pickles (`load_edm`) and the CM
paper's guided-diffusion state dicts (`load_cm`).

An EDM snapshot (`network-snapshot-*.pkl`, `edm-cifar10-32x32-uncond-vp.pkl`, ...) is a pickle of
dict(ema=<EDMPrecond | VPPrecond | VEPrecond>, loss_fn=..., augment_pipe=..., dataset_kwargs=...) whose modules are
`torch_utils.persistence` classes carrying their source code. It is read by formats.torch_pickle's restricted
unpickler (nothing from the file is imported or run, no PyTorch needed); the network's constructor arguments (the
`_init_kwargs` EDM records) give the cm_jax config (NCSNpp or ADM with layout='edm', models/edm.py), and its
tensors, named as EDM names them, become the parameters through formats.diffusers' PyTorch -> Flax converter.
"""

import contextlib
import io
import re
import zipfile
from typing import Any, NamedTuple

import flax
import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from cm_jax import models
from cm_jax import parameterization
from cm_jax.formats import diffusers
from cm_jax.formats import torch_pickle

PRECONDITIONINGS = {'EDMPrecond': 'edm', 'VPPrecond': 'vp', 'VEPrecond': 've'}
# EDM's constructor defaults (training/networks.py), for the arguments a pickle's _init_kwargs leaves out.
_SONG_DEFAULTS = dict(label_dim=0, augment_dim=0, model_channels=128, channel_mult=[1, 2, 2, 2], channel_mult_emb=4,
                      num_blocks=4, attn_resolutions=[16], dropout=0.10, label_dropout=0,
                      embedding_type='positional', channel_mult_noise=1, encoder_type='standard',
                      decoder_type='standard', resample_filter=[1, 1])
_DHARIWAL_DEFAULTS = dict(label_dim=0, augment_dim=0, model_channels=192, channel_mult=[1, 2, 3, 4],
                          channel_mult_emb=4, num_blocks=3, attn_resolutions=[32, 16, 8], dropout=0.10,
                          label_dropout=0)
_PRECOND_DEFAULTS = {'edm': dict(sigma_min=0.0, sigma_max=float('inf'), sigma_data=0.5),
                     'vp': dict(beta_d=19.9, beta_min=0.1, M=1000, epsilon_t=1e-5),
                     've': dict(sigma_min=0.02, sigma_max=100.0)}


def _song_config(kw: dict) -> dict:
  """The NCSNpp(layout='edm') config of SongUNet's constructor arguments."""
  if kw['encoder_type'] not in ('standard', 'residual'):
    raise ValueError(f"SongUNet encoder_type={kw['encoder_type']!r} is not supported (only 'standard' and "
                     "'residual', EDM's DDPM++ and NCSN++).")
  fourier = kw['embedding_type'] == 'fourier'
  return dict(name='ncsnpp', layout='edm', channels=int(kw['model_channels']),
              channel_mult=tuple(int(m) for m in kw['channel_mult']), emb_mult=int(kw['channel_mult_emb']),
              num_res_blocks=int(kw['num_blocks']), attn_resolutions=tuple(int(r) for r in kw['attn_resolutions']),
              dropout=float(kw['dropout']), num_classes=int(kw['label_dim']),
              label_dropout=float(kw['label_dropout']), augment_dim=int(kw['augment_dim']),
              time_embedding=str(kw['embedding_type']), time_scale=16.0 if fourier else 1.0,
              noise_mult=int(kw['channel_mult_noise']), residual_input=kw['encoder_type'] == 'residual',
              decoder_type=str(kw['decoder_type']), resample_filter=tuple(int(f) for f in kw['resample_filter']),
              adaptive_norm='shift')


def _dhariwal_config(kw: dict) -> dict:
  """The ADM(layout='edm') config of DhariwalUNet's constructor arguments."""
  return dict(name='adm', layout='edm', channels=int(kw['model_channels']),
              channel_mult=tuple(int(m) for m in kw['channel_mult']), emb_mult=int(kw['channel_mult_emb']),
              num_res_blocks=int(kw['num_blocks']), attn_resolutions=tuple(int(r) for r in kw['attn_resolutions']),
              head_dim=64, dropout=float(kw['dropout']), num_classes=int(kw['label_dim']),
              label_dropout=float(kw['label_dropout']), augment_dim=int(kw['augment_dim']),
              time_embedding='positional', time_scale=1.0, adaptive_norm='scale_shift')


_NETWORKS = {'SongUNet': (_SONG_DEFAULTS, _song_config), 'DhariwalUNet': (_DHARIWAL_DEFAULTS, _dhariwal_config)}


class EDMNetwork(NamedTuple):
  """An EDM network read into cm_jax: `model_config, params, preconditioning = load_edm(path)`.

  model_config: the models.build_model config (NCSNpp or ADM with layout='edm').
  params: the Flax parameters (numpy float32).
  preconditioning: dict(name='edm' | 'vp' | 've', the preconditioning's constants (EDM: sigma_data, sigma_min,
    sigma_max; VP: beta_d, beta_min, M, epsilon_t, sigma_min, sigma_max; VE: sigma_min, sigma_max), use_fp16, and
    the data it was trained on: resolution, channels).
  """
  model_config: dict
  params: Any
  preconditioning: dict

  def denoise(self, x, sigma, labels=None, augment_labels=None):
    """EDM's D(x; sigma) with the file's own preconditioning: x [B, H, W, C] float32, sigma [B], labels int [B]
    (< 0 or None: no label, EDM's zero class vector) or None, augment_labels [B, augment_dim] or None."""
    model = models.build_model(self.model_config)
    x = jnp.asarray(x, jnp.float32)
    sigma = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), x.shape[:1])
    cond = None
    if self.model_config['num_classes']:
      cond = jnp.full(x.shape[:1], -1, jnp.int32) if labels is None else jnp.asarray(labels, jnp.int32)
    extra = {} if augment_labels is None else {'augment_labels': jnp.asarray(augment_labels, jnp.float32)}
    net = lambda x_in, c_noise: model.apply({'params': self.params}, x_in, c_noise, cond, **extra)
    return precondition(self.preconditioning, net, x, sigma)


def precondition(preconditioning: dict, net, x, sigma):
  """D(x; sigma) = c_skip x + c_out F(c_in x, c_noise) of EDM's EDMPrecond / VPPrecond / VEPrecond, net(x_in, c_noise)
  -> F. EDM's goes through parameterization.EDM (the same c_noise = ln(sigma) / 4)."""
  p, b = preconditioning, lambda v: parameterization.bcast(v, x)
  if p['name'] == 'edm':
    return parameterization.EDM(sigma_data=p['sigma_data']).denoise(net, x, sigma)
  if p['name'] == 'vp':
    beta_d, beta_min = p['beta_d'], p['beta_min']
    t = (jnp.sqrt(beta_min**2 + 2 * beta_d * jnp.log1p(sigma**2)) - beta_min) / beta_d  # EDM's sigma_inv
    return x - b(sigma) * net(b(1 / jnp.sqrt(sigma**2 + 1)) * x, (p['M'] - 1) * t)
  if p['name'] == 've':
    return x + b(sigma) * net(x, jnp.log(0.5 * sigma))
  raise ValueError(f"Unknown preconditioning {p['name']!r}; expected one of {sorted(PRECONDITIONINGS.values())}.")


def _describe(obj) -> str:
  """What a pickled object is, in a few words, for an error message."""
  if isinstance(obj, torch_pickle.PersistentObject):
    return f'an object of class {obj.class_name}'
  if isinstance(obj, torch_pickle.Record):
    return f'an object of class {obj.qualname}'
  if isinstance(obj, dict):
    return f'a dict with keys {sorted(map(str, obj))[:8]}'
  return f'a {type(obj).__name__}'


def _plain(value):
  """An _init_kwargs value as plain Python (EDM's EasyDicts arrive as Records with items)."""
  if isinstance(value, torch_pickle.Record):
    return {k: _plain(v) for k, v in value.items.items()} if value.items else [_plain(v) for v in value.entries]
  if isinstance(value, dict):
    return {k: _plain(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_plain(v) for v in value]
  return value


def _init_kwargs(obj, where: str) -> dict:
  kwargs = _plain(torch_pickle.module_state(obj).get('_init_kwargs'))
  if not isinstance(kwargs, dict):
    raise ValueError(f'{where}: its {obj.class_name} has no recorded constructor arguments (_init_kwargs).')
  return kwargs


def _resample_filter_ok(value: np.ndarray, taps) -> bool:
  taps = np.asarray(taps, np.float32)
  expected = np.outer(taps, taps) / np.sum(taps) ** 2
  return value.shape == (1, 1) + expected.shape and np.allclose(value[0, 0], expected)


def _flax_shape(shape: tuple, expected: tuple) -> tuple:
  """The Flax-layout shape of a PyTorch tensor's shape (as formats.diffusers converts it)."""
  if len(shape) == 4 and len(expected) == 2 and shape[2:] == (1, 1):
    return shape[1], shape[0]
  if len(shape) == 4:
    return shape[2], shape[3], shape[1], shape[0]
  if len(shape) == 2:
    return shape[1], shape[0]
  return shape


def _torch_name(path: str) -> str:
  """A Flax path as the PyTorch name it is read from ('input_blocks_1_0/in_layers_2/kernel' ->
  'input_blocks.1.0.in_layers.2.weight'; EDM's names have no '_<digit>' parts)."""
  parts = [re.sub(r'_(\d+)(?=_\d|$)', r'.\1', part) for part in path.split('/')]
  parts = [re.sub(r'_(\d+)(?=\.)', r'.\1', part) for part in parts]
  parts[-1] = {'kernel': 'weight', 'scale': 'weight', 'embedding': 'weight'}.get(parts[-1], parts[-1])
  return '.'.join(parts)


def _params(model, state_dict: dict, resolution: int, channels: int, taps, where: str, prefix: str = 'model.',
            described: str = 'the network its constructor arguments describe', shardings=None):
  """The Flax parameters of `model` from a state dict of its network (EDM's with the 'model.' prefix removed; its
  values arrays or _LazyTensors). With `shardings` (a tree of jax.sharding.Sharding like the parameters) each leaf
  is read, converted and placed on the devices in turn, so that host memory holds one tensor at a time."""
  cond = jnp.zeros((1,), jnp.int32) if model.num_classes else None
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, resolution, resolution, channels)),
                                               jnp.zeros((1,)), cond))['params']
  expected = {path: leaf.shape for path, leaf in flax.traverse_util.flatten_dict(abstract, sep='/').items()}
  tensors, by_path = {}, {}
  for key, value in state_dict.items():
    if key.endswith('.resample_filter'):  # EDM's constant FIR buffers: the config's filter, checked
      if not _resample_filter_ok(value, taps):
        raise ValueError(f'{where}: buffer {prefix}{key} {value.shape} is not the filter {list(taps)} its '
                         'constructor arguments name.')
      continue
    tensors[key] = value
    module, _, leaf = diffusers.flax_path(key).rpartition('/')  # module '': a top-level tensor, never a parameter
    if leaf == 'weight':  # as formats.diffusers reads it: a norm's scale, an embedding table or a kernel
      leaf = next((name for name in ('scale', 'embedding') if f'{module}/{name}' in expected), 'kernel')
    by_path[f'{module}/{leaf}'] = key
  for path, shape in expected.items():  # the first missing or mis-shaped tensor first: it names both shapes
    if path not in by_path:
      raise ValueError(f'{where}: the file lacks the tensor {prefix}{_torch_name(path)} (shape {tuple(shape)} in '
                       f'Flax layout) of {described}.')
    key = by_path[path]
    got = tuple(tensors[key].shape)
    got = _flax_shape(got, tuple(shape)) if path.endswith('/kernel') else got
    if got != tuple(shape):
      raise ValueError(f'{where}: tensor {prefix}{key} has shape {tuple(tensors[key].shape)} ({got} in Flax '
                       f'layout); {described} needs {tuple(shape)}.')
  unexpected = [key for path, key in by_path.items() if path not in expected]
  if unexpected:
    raise ValueError(f'{where}: tensor {prefix}{unexpected[0]} {tensors[unexpected[0]].shape} has no place in '
                     f'{described} ({len(unexpected)} such tensors).')
  if shardings is None:
    return diffusers.from_diffusers({k: np.asarray(v) for k, v in tensors.items()}, abstract, where)
  placed, targets = {}, flax.traverse_util.flatten_dict(shardings, sep='/')
  for path, shape in expected.items():
    one = flax.traverse_util.unflatten_dict({path: jax.ShapeDtypeStruct(shape, jnp.float32)}, sep='/')
    value = diffusers.from_diffusers({by_path[path]: np.asarray(tensors[by_path[path]])}, one, where)
    placed[path] = jax.device_put(flax.traverse_util.flatten_dict(value, sep='/')[path], targets[path])
  return flax.traverse_util.unflatten_dict(placed, sep='/')


class _LazyTensor:
  """A tensor of a zip-format torch.save file, read from its storage member only when converted (np.asarray)."""

  def __init__(self, archive: zipfile.ZipFile, prefix: str, ref):
    self._archive, self._prefix, self._ref = archive, prefix, ref
    self.shape = tuple(ref.shape)
    self.ndim = len(self.shape)

  def __array__(self, dtype=None, copy=None):
    del copy
    storage = self._ref.storage
    try:
      flat = np.frombuffer(self._archive.read(f'{self._prefix}data/{storage.key}'), storage.dtype)
      value = torch_pickle._materialize(self._ref, {storage.key: flat}, copy=False)  # pylint: disable=protected-access
    except Exception as e:  # a damaged member: zip, CRC and layout errors alike
      raise ValueError(f'{self._archive.filename or "the file"}: storage {storage.key} is not readable '
                       f'({" ".join(str(e).split()) or type(e).__name__}).') from e
    return value if dtype is None else value.astype(dtype)


def _lazy_state_dict(path: epath.Path, archive: zipfile.ZipFile) -> dict:
  """{name: _LazyTensor} of a zip-format torch.save state dict (torch_pickle.load_state_dict's reading, with each
  storage left in the file until its tensor is converted)."""
  try:
    pickles = [name for name in archive.namelist() if name.endswith('/data.pkl') and name.count('/') == 1]
    if not pickles:
      raise ValueError('the zip archive has no <name>/data.pkl')
    prefix = pickles[0][:-len('data.pkl')]
    if prefix + 'byteorder' in archive.namelist() and archive.read(prefix + 'byteorder') != b'little':
      raise ValueError('only little-endian files are supported')
    data = io.BytesIO(archive.read(pickles[0]))
    refs = torch_pickle._tensor_refs(torch_pickle._unpickle(data))  # pylint: disable=protected-access
    members = set(archive.namelist())
    for name, ref in refs.items():
      if f'{prefix}data/{ref.storage.key}' not in members:
        raise ValueError(f'the storage of {name} is missing')
    return {name: _LazyTensor(archive, prefix, ref) for name, ref in refs.items()}
  except Exception as e:  # pickle, zip and layout errors alike
    raise ValueError(f'{path} is not a readable PyTorch state dict: {" ".join(str(e).split()) or type(e).__name__}'
                     ) from e


def load_edm(path) -> EDMNetwork:
  """Reads EDM's network pickle at `path` (its 'ema' network) into a cm_jax network, without running its code.

  Returns:
    EDMNetwork(model_config, params, preconditioning); `.denoise(x, sigma, labels)` is the file's D(x; sigma).

  Raises:
    FileNotFoundError: no file at `path`.
    ValueError: the file is not an EDM network pickle, holds an unsupported network or preconditioning, or its
      tensors do not fit the network its constructor arguments describe (one line, naming the cause).
  """
  path = epath.Path(path)
  where = str(path)
  data = torch_pickle.load_module_pickle(path)
  ema = data.get('ema') if isinstance(data, dict) else None
  if ema is None:
    raise ValueError(f"{where} is not an EDM network snapshot (a dict with an 'ema' network): it holds "
                     f'{_describe(data)}.')
  if not isinstance(ema, torch_pickle.PersistentObject) or ema.class_name not in PRECONDITIONINGS:
    raise ValueError(f"{where}: its 'ema' network is {_describe(ema)}; expected one of EDM's "
                     f'{sorted(PRECONDITIONINGS)} (iDDPMPrecond and other networks are not supported).')
  state = torch_pickle.module_state(ema)
  net = (state.get('_modules') or {}).get('model')
  if not isinstance(net, torch_pickle.PersistentObject) or net.class_name not in _NETWORKS:
    raise ValueError(f'{where}: its {ema.class_name} wraps {_describe(net)}; expected one of EDM\'s '
                     f'{sorted(_NETWORKS)}.')
  defaults, to_config = _NETWORKS[net.class_name]
  kwargs = {**defaults, **_init_kwargs(net, where)}
  if int(kwargs.get('in_channels', -1)) != int(kwargs.get('out_channels', -2)):
    raise ValueError(f"{where}: its {net.class_name} maps {kwargs.get('in_channels')} channels to "
                     f"{kwargs.get('out_channels')}; cm_jax networks keep the channels of their input.")
  model_config = to_config(kwargs)
  name = PRECONDITIONINGS[ema.class_name]
  precond = dict(name=name)
  for key, default in _PRECOND_DEFAULTS[name].items():
    precond[key] = float(state.get(key, default))
  if name == 'vp':
    precond['M'] = int(precond['M'])
    precond['sigma_min'], precond['sigma_max'] = float(state['sigma_min']), float(state['sigma_max'])
  resolution, channels = int(kwargs['img_resolution']), int(kwargs['in_channels'])
  precond.update(use_fp16=bool(state.get('use_fp16', False)), resolution=resolution, channels=channels)
  model = models.build_model(model_config)
  taps = model_config.get('resample_filter', (1, 1))
  params = _params(model, torch_pickle.module_state_dict(net), resolution, channels, taps, where)
  return EDMNetwork(model_config, params, precond)


# The CM paper's released networks (openai/consistency_models scripts/launch.sh, script_util's channel_mult by image
# size): ImageNet-64 (class-conditional) and LSUN-256 (bedroom, cat). time_scale 1000: the CM code feeds the network
# 1000 * 0.25 ln(sigma).
CM_CONFIGS = {
    'imagenet64': (64, dict(name='adm', layout='guided_diffusion', channels=192, channel_mult=(1, 2, 3, 4),
                            num_res_blocks=3, attn_resolutions=(32, 16, 8), head_dim=64, num_classes=1000,
                            adaptive_norm='scale_shift', resblock_updown=True, time_scale=1000.0, dropout=0.0)),
    'lsun256': (256, dict(name='adm', layout='guided_diffusion', channels=256, channel_mult=(1, 1, 2, 2, 4, 4),
                          num_res_blocks=2, attn_resolutions=(32, 16, 8), head_dim=64, num_classes=0,
                          adaptive_norm='shift', resblock_updown=True, time_scale=1000.0, dropout=0.0)),
}
CM_PRECONDITIONING = dict(sigma_data=0.5, sigma_min=0.002, sigma_max=80.0)


class CMNetwork(NamedTuple):
  """A CM-paper network read into cm_jax: `model_config, params, preconditioning = load_cm(path)`.

  preconditioning: dict(name='consistency' (a consistency model: f with the sigma_min boundary) or 'edm' (an EDM
  teacher, edm_*_ema.pt: the denoiser D), sigma_data, sigma_min, sigma_max, resolution, channels).
  """
  model_config: dict
  params: Any
  preconditioning: dict

  def _net(self, labels, batch):
    model = models.build_model(self.model_config)
    cond = None
    if self.model_config['num_classes']:
      if labels is None:
        raise ValueError('this network is class-conditional: give labels.')
      cond = jnp.broadcast_to(jnp.asarray(labels, jnp.int32), (batch,))
    return lambda x_in, c_noise: model.apply({'params': self.params}, x_in, c_noise, cond)

  def _process(self):
    p = self.preconditioning
    return parameterization.EDM(p['sigma_data'], p['sigma_min'], p['sigma_max'])

  def consistency(self, x, sigma, labels=None):
    """The checkpoint's f(x, sigma) (CM's boundary scalings): x [B, H, W, C], sigma [B], labels int [B] or None."""
    x = jnp.asarray(x, jnp.float32)
    sigma = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), x.shape[:1])
    return self._process().consistency(self._net(labels, x.shape[0]), x, sigma)

  def denoise(self, x, sigma, labels=None):
    """EDM's D(x; sigma) of the network (the EDM teachers' output)."""
    x = jnp.asarray(x, jnp.float32)
    sigma = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), x.shape[:1])
    return self._process().denoise(self._net(labels, x.shape[0]), x, sigma)


def load_cm(path, model_config=None, resolution=None, kind=None, shardings=None) -> CMNetwork:
  """Reads a CM-paper `.pt` state dict (openai/consistency_models' UNetModel) into ADM(layout='guided_diffusion').

  Args:
    path: the torch.save file (cd_imagenet64_lpips.pt, edm_imagenet64_ema.pt, ct_bedroom256.pt, ...).
    model_config: the network's models.build_model config; None: CM_CONFIGS['imagenet64'] when the file has class
      embeddings, CM_CONFIGS['lsun256'] otherwise.
    resolution: the image size the network was trained on (None: that of the CM_CONFIGS entry; required with a
      model_config of its own).
    kind: 'consistency' or 'edm' (an EDM teacher); None: 'edm' for files named edm_*, 'consistency' otherwise.
    shardings: None (numpy parameters) or the parameters' shardings: each tensor of a zip-format file is then read,
      converted and placed in turn (host memory of about one tensor beyond what the devices hold).

  Raises:
    FileNotFoundError: no file at `path`.
    ValueError: not a state dict, or a tensor missing, extra or mis-shaped for the network (naming it and both
      shapes).
  """
  path = epath.Path(path)
  where = str(path)
  if not path.is_file():
    raise FileNotFoundError(f'No file at {path}.')
  with contextlib.ExitStack() as stack:
    f = stack.enter_context(path.open('rb'))
    if shardings is not None and zipfile.is_zipfile(f):
      state_dict = _lazy_state_dict(path, stack.enter_context(zipfile.ZipFile(f)))
    else:
      state_dict = torch_pickle.load_state_dict(path)
    return _read_cm(path, where, state_dict, model_config, resolution, kind, shardings)


def _read_cm(path, where, state_dict, model_config, resolution, kind, shardings) -> CMNetwork:
  """load_cm on the file's state dict (arrays, or _LazyTensors of the open file)."""
  if model_config is None:
    preset = 'imagenet64' if 'label_emb.weight' in state_dict else 'lsun256'
    preset_resolution, model_config = CM_CONFIGS[preset]
    resolution = resolution or preset_resolution
    described = f"the CM paper's {preset} network"
  else:
    model_config = dict(model_config)
    described = 'the network of model_config'
    if resolution is None:
      raise ValueError('load_cm: give the resolution of a network described by its own model_config.')
  if model_config.get('layout') != 'guided_diffusion':
    raise ValueError(f"load_cm reads ADM(layout='guided_diffusion') networks; model_config has layout "
                     f"{model_config.get('layout')!r}.")
  kind = kind or ('edm' if path.name.startswith('edm_') else 'consistency')
  if kind not in ('consistency', 'edm'):
    raise ValueError(f"load_cm kind={kind!r}; expected 'consistency' or 'edm'.")
  out = state_dict.get('out.2.weight')
  channels = int(out.shape[0]) if out is not None and out.ndim == 4 else 3
  if 'input_blocks.0.0.weight' in state_dict and state_dict['input_blocks.0.0.weight'].shape[1] != channels:
    raise ValueError(f"{where}: its network maps {state_dict['input_blocks.0.0.weight'].shape[1]} channels to "
                     f'{channels} (learn_sigma?); cm_jax networks keep the channels of their input.')
  model = models.build_model(model_config)
  params = _params(model, state_dict, int(resolution), channels, (1, 1), where, prefix='', described=described,
                   shardings=shardings)
  precond = dict(name=kind, **CM_PRECONDITIONING, resolution=int(resolution), channels=channels)
  return CMNetwork(model_config, params, precond)
