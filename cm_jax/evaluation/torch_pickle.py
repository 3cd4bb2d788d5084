"""Reads a PyTorch state dict (a `torch.save` file) into numpy arrays without importing torch.

Both `torch.save` formats are read: the zip archive (torch >= 1.6: `<name>/data.pkl` plus one raw little-endian
file `<name>/data/<key>` per storage) and the legacy stream (five pickles -- magic number, protocol 1001, system
info, the object, the list of storage keys -- followed, for each key in that order, by an int64 element count and
the raw little-endian bytes). The object pickles go through a restricted unpickler that resolves only the globals
a state dict of float32/int64 tensors needs (`collections.OrderedDict`, `torch._utils._rebuild_tensor_v2`,
`torch.FloatStorage`, `torch.LongStorage`) and refuses every other one, so loading runs no code from the file.
"""

import collections
import io
import pickle
import zipfile
from typing import NamedTuple

import numpy as np
from etils import epath

_LEGACY_MAGIC = 0x1950a86a20f9469cfc6c
_LEGACY_PROTOCOL = 1001
_STORAGE_DTYPES = {'FloatStorage': np.dtype('<f4'), 'LongStorage': np.dtype('<i8')}


class _Storage(NamedTuple):
  """A storage named in the pickle: its key in the file and its element type."""
  key: str
  dtype: np.dtype


class _TensorRef(NamedTuple):
  """A tensor as the pickle describes it: a strided view (in elements) of a storage."""
  storage: _Storage
  offset: int
  shape: tuple
  stride: tuple


def _rebuild_tensor(storage, offset, shape, stride, *unused):
  """Stands in for torch._utils._rebuild_tensor_v2 (the rest: requires_grad, backward hooks, metadata)."""
  return _TensorRef(storage, offset, tuple(shape), tuple(stride))


_GLOBALS = {('collections', 'OrderedDict'): collections.OrderedDict,
            ('torch._utils', '_rebuild_tensor_v2'): _rebuild_tensor,
            **{('torch', name): dtype for name, dtype in _STORAGE_DTYPES.items()}}


class _RestrictedUnpickler(pickle.Unpickler):
  """Unpickles with the globals of _GLOBALS only; storages become _Storage records."""

  def find_class(self, module, name):
    if (module, name) not in _GLOBALS:
      raise pickle.UnpicklingError(f'refusing the global {module}.{name} (only float32/int64 tensors are read)')
    return _GLOBALS[module, name]

  def persistent_load(self, pid):
    # ('storage', storage type, key, location, numel), plus a view field (None) in the legacy format.
    if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == 'storage' and isinstance(pid[1], np.dtype)
            and pid[5:] in ((), (None,))):
      raise pickle.UnpicklingError(f'unsupported persistent id {pid!r}')
    return _Storage(str(pid[2]), pid[1])


def _unpickle(file):
  return _RestrictedUnpickler(file).load()


def _tensor_refs(obj) -> dict:
  """Checks that the object is a dict of name -> tensor and returns it."""
  if not isinstance(obj, dict):
    raise ValueError(f'it holds a {type(obj).__name__}, not a state dict (a dict of name -> tensor)')
  for name, value in obj.items():
    if not isinstance(value, _TensorRef):
      raise ValueError(f'entry {name!r} is a {type(value).__name__}, not a tensor')
  return obj


def _read_zip(data: bytes):
  """(tensor refs, {storage key: flat array}) of a zip-format file."""
  with zipfile.ZipFile(io.BytesIO(data)) as archive:
    pickles = [name for name in archive.namelist() if name.endswith('/data.pkl') and name.count('/') == 1]
    if not pickles:
      raise ValueError('the zip archive has no <name>/data.pkl')
    prefix = pickles[0][:-len('data.pkl')]
    if prefix + 'byteorder' in archive.namelist() and archive.read(prefix + 'byteorder') != b'little':
      raise ValueError('only little-endian files are supported')  # Files before torch 1.13 have no such record.
    refs = _tensor_refs(_unpickle(io.BytesIO(archive.read(pickles[0]))))
    storages = {ref.storage for ref in refs.values()}
    return refs, {s.key: np.frombuffer(archive.read(f'{prefix}data/{s.key}'), s.dtype) for s in storages}


def _read_legacy(data: bytes):
  """(tensor refs, {storage key: flat array}) of a legacy-format file."""
  with io.BytesIO(data) as f:
    if _unpickle(f) != _LEGACY_MAGIC:
      raise ValueError('it is neither a zip archive nor a legacy torch.save stream (wrong magic number)')
    if _unpickle(f) != _LEGACY_PROTOCOL:
      raise ValueError(f'unsupported legacy protocol (expected {_LEGACY_PROTOCOL})')
    if not _unpickle(f).get('little_endian'):
      raise ValueError('only little-endian files are supported')
    refs = _tensor_refs(_unpickle(f))
    dtypes = {ref.storage.key: ref.storage.dtype for ref in refs.values()}
    storages = {}
    for key in _unpickle(f):
      count = int(np.frombuffer(f.read(8), '<i8')[0])
      raw = f.read(count * dtypes[key].itemsize)
      if len(raw) != count * dtypes[key].itemsize:
        raise ValueError(f'storage {key} is truncated')
      storages[key] = np.frombuffer(raw, dtypes[key])
    return refs, storages


def _materialize(ref: _TensorRef, flat: np.ndarray) -> np.ndarray:
  """A copy of the strided view ref of the flat storage, after checking that it lies inside it."""
  if not ref.shape or min(ref.shape) > 0:
    last = ref.offset + sum((n - 1) * s for n, s in zip(ref.shape, ref.stride))
    if ref.offset < 0 or min(ref.stride, default=0) < 0 or last >= len(flat):
      raise ValueError(f'a tensor view reaches outside its storage {ref.storage.key}')
  view = np.lib.stride_tricks.as_strided(flat[ref.offset:], ref.shape, [s * flat.itemsize for s in ref.stride])
  return view.copy()


def load_state_dict(path) -> dict[str, np.ndarray]:
  """Reads the torch.save file at `path` (zip or legacy format; any epath) into {name: numpy array}, in file order.

  Raises:
    FileNotFoundError: no file at `path`.
    ValueError: the file is not a torch.save file of a dict of float32/int64 tensors (one line, naming the cause).
  """
  path = epath.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f'No file at {path}.')
  data = path.read_bytes()
  try:
    refs, storages = (_read_zip if zipfile.is_zipfile(io.BytesIO(data)) else _read_legacy)(data)
    return {name: _materialize(ref, storages[ref.storage.key]) for name, ref in refs.items()}
  except Exception as e:  # Pickle, zip, IO and layout errors alike.
    cause = ' '.join(str(e).split()) or type(e).__name__
    raise ValueError(f'{path} is not a readable PyTorch state dict: {cause}') from e
