"""PyTorch files read into numpy arrays without importing torch and without running any code from the file.

Two kinds of file:
  * `torch.save` state dicts (`load_state_dict`): the zip archive (torch >= 1.6: `<name>/data.pkl` plus one raw
    little-endian file `<name>/data/<key>` per storage) and the legacy stream (five pickles -- magic number, protocol
    1001, system info, the object, the list of storage keys -- followed, for each key in that order, by an int64
    element count and the raw little-endian bytes).
  * plain pickles of torch modules (`load_module_pickle`), such as EDM's network snapshots: each storage is a
    `torch.storage._load_from_bytes(<a legacy torch.save stream of that storage>)` call, each module the state
    (`__dict__`) of an object, and the classes of `torch_utils.persistence` (which embed their module's source code
    and exec it on a normal unpickling) arrive as `_reconstruct_persistent_obj(meta)` calls.

Every pickle goes through a restricted unpickler that resolves a fixed list of globals (OrderedDict, the tensor,
parameter and storage rebuilders, torch.Size) to this module's own stand-ins and refuses every other global, so
nothing from the file is imported or called. For module pickles the classes of torch.nn, EDM's `torch_utils`,
`training` and `dnnlib` packages become inert `Record`s (the class name and the pickled state), and a persistent
object becomes a `PersistentObject` (its class name and state); its embedded source code is dropped unread.
"""

import collections
import functools
import io
import pickle
import zipfile
from typing import Any, NamedTuple

import ml_dtypes
import numpy as np
from etils import epath

_LEGACY_MAGIC = 0x1950a86a20f9469cfc6c
_LEGACY_PROTOCOL = 1001
_STORAGE_DTYPES = {
    'FloatStorage': np.dtype('<f4'), 'DoubleStorage': np.dtype('<f8'), 'HalfStorage': np.dtype('<f2'),
    'BFloat16Storage': np.dtype(ml_dtypes.bfloat16), 'LongStorage': np.dtype('<i8'), 'IntStorage': np.dtype('<i4'),
    'ShortStorage': np.dtype('<i2'), 'CharStorage': np.dtype('i1'), 'ByteStorage': np.dtype('u1'),
    'BoolStorage': np.dtype('?')}
# Packages whose classes become inert Records in a module pickle: torch's modules and EDM's own packages.
_RECORD_PACKAGES = ('torch.nn.modules.', 'torch_utils.', 'training.', 'dnnlib.')


class _Storage(NamedTuple):
  """A storage named in the pickle: its key in the file and its element type."""
  key: str
  dtype: np.dtype


class _TensorRef(NamedTuple):
  """A tensor as the pickle describes it: a strided view (in elements) of a storage (a _Storage of the file, or the
  flat array of a storage pickled inline)."""
  storage: Any
  offset: int
  shape: tuple
  stride: tuple


class Record:
  """An inert stand-in for an object of an allowed class: its class name, constructor arguments, pickled state and
  any items or list entries the pickle set on it. Nothing of the class itself is imported."""
  qualname = '?'

  def __new__(cls, *args, **kwargs):
    obj = super().__new__(cls)
    obj.args, obj.state, obj.items, obj.entries = args, None, {}, []
    return obj

  def __init__(self, *args, **kwargs):
    pass

  def __setstate__(self, state):
    self.state = state

  def __setitem__(self, key, value):
    self.items[key] = value

  def append(self, value):
    self.entries.append(value)

  def extend(self, values):
    self.entries.extend(values)

  def __repr__(self):
    return f'<{self.qualname}>'


@functools.cache
def _record_class(qualname: str) -> type:
  return type(qualname.rsplit('.', 1)[-1], (Record,), {'qualname': qualname})


class PersistentObject(NamedTuple):
  """An object of a `torch_utils.persistence` class: its class name and pickled state (a module's __dict__)."""
  class_name: str
  state: dict


def _reconstruct_persistent(meta):
  """Stands in for torch_utils.persistence._reconstruct_persistent_obj: keeps the class name and state, never the
  source code."""
  if not isinstance(meta, dict) or meta.get('type') != 'class' or not isinstance(meta.get('state'), dict):
    raise pickle.UnpicklingError('a persistent object without a class type and state')
  return PersistentObject(str(meta.get('class_name')), meta['state'])


def _rebuild_tensor(storage, offset, shape, stride, *unused):
  """Stands in for torch._utils._rebuild_tensor_v2 (the rest: requires_grad, backward hooks, metadata)."""
  return _TensorRef(storage, offset, tuple(shape), tuple(stride))


def _rebuild_parameter(data, *unused):
  """Stands in for torch._utils._rebuild_parameter(_with_state): a parameter is its tensor."""
  return data


def _load_storage_bytes(data):
  """Stands in for torch.storage._load_from_bytes: the flat array of a legacy torch.save stream of one storage (a
  read-only view of the pickle's bytes, not a copy)."""
  if not isinstance(data, (bytes, bytearray)):
    raise pickle.UnpicklingError('an inline storage that is not bytes')
  storage, storages = _read_legacy(data)
  if not isinstance(storage, _Storage):
    raise pickle.UnpicklingError(f'an inline storage holds a {type(storage).__name__}')
  return storages[storage.key]


class _NumpyDType(Record):
  """Stands in for numpy.dtype(name, align, copy) plus its pickled state (whose second entry is the byte order)."""
  qualname = 'numpy.dtype'

  def resolve(self) -> np.dtype:
    name = self.args[0] if self.args and isinstance(self.args[0], str) else None
    order = self.state[1] if isinstance(self.state, tuple) and len(self.state) > 1 else '='
    if name is None or not name.isalnum() or order not in '<>|=':
      raise pickle.UnpicklingError(f'unsupported numpy dtype {self.args!r}')
    dtype = np.dtype(name)
    if dtype.kind not in 'biuf':
      raise pickle.UnpicklingError(f'unsupported numpy dtype {name!r}')
    return dtype.newbyteorder(order) if order in '<>' else dtype


def _numpy_scalar(dtype, data=None):
  """Stands in for numpy.core.multiarray.scalar: a numeric numpy scalar from its bytes."""
  dtype = dtype.resolve() if isinstance(dtype, _NumpyDType) else dtype
  if not isinstance(dtype, np.dtype) or not isinstance(data, bytes) or len(data) != dtype.itemsize:
    raise pickle.UnpicklingError('unsupported numpy scalar')
  return np.frombuffer(data, dtype)[0]


_NUMPY_GLOBALS = {('numpy', 'dtype'): _NumpyDType,
                  **{(module, 'scalar'): _numpy_scalar for module in ('numpy.core.multiarray',
                                                                      'numpy._core.multiarray')},
                  # numpy arrays outside the network (none in EDM's modules) stay inert records.
                  **{(module, '_reconstruct'): _record_class(f'{module}._reconstruct')
                     for module in ('numpy.core.multiarray', 'numpy._core.multiarray')},
                  ('numpy', 'ndarray'): _record_class('numpy.ndarray')}


_TENSOR_GLOBALS = {('collections', 'OrderedDict'): collections.OrderedDict,
                   ('torch._utils', '_rebuild_tensor_v2'): _rebuild_tensor,
                   ('torch._utils', '_rebuild_parameter'): _rebuild_parameter,
                   ('torch._utils', '_rebuild_parameter_with_state'): _rebuild_parameter,
                   **{('torch', name): dtype for name, dtype in _STORAGE_DTYPES.items()}}
_MODULE_GLOBALS = {**_TENSOR_GLOBALS,
                   ('torch.storage', '_load_from_bytes'): _load_storage_bytes,
                   ('torch', 'Size'): tuple,
                   ('torch_utils.persistence', '_reconstruct_persistent_obj'): _reconstruct_persistent,
                   ('builtins', 'set'): set, ('builtins', 'frozenset'): frozenset,
                   **_NUMPY_GLOBALS}


class _RestrictedUnpickler(pickle.Unpickler):
  """Unpickles with the given globals only (and inert Records for the classes of _RECORD_PACKAGES when `records`);
  storages named by persistent id become _Storage records."""

  def __init__(self, file, allowed, records=False):
    super().__init__(file)
    self._allowed, self._records = allowed, records
    self.storage_dtypes = {}  # key -> dtype of each storage a persistent id named

  def find_class(self, module, name):
    if (module, name) in self._allowed:
      return self._allowed[module, name]
    if self._records and module.startswith(_RECORD_PACKAGES) and name.isidentifier() and name[:1].isupper():
      return _record_class(f'{module}.{name}')
    raise pickle.UnpicklingError(f'refusing the global {module}.{name} (only tensors and module state are read)')

  def persistent_load(self, pid):
    # ('storage', storage type, key, location, numel), plus a view field (None) in the legacy format.
    if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == 'storage' and isinstance(pid[1], np.dtype)
            and pid[5:] in ((), (None,))):
      raise pickle.UnpicklingError(f'unsupported persistent id {pid!r}')
    self.storage_dtypes[str(pid[2])] = pid[1]
    return _Storage(str(pid[2]), pid[1])


def _unpickle(file):
  return _RestrictedUnpickler(file, _TENSOR_GLOBALS).load()


def _tensor_refs(obj) -> dict:
  """Checks that the object is a dict of name -> tensor and returns it."""
  if not isinstance(obj, dict):
    raise ValueError(f'it holds a {type(obj).__name__}, not a state dict (a dict of name -> tensor)')
  for name, value in obj.items():
    if not isinstance(value, _TensorRef):
      raise ValueError(f'entry {name!r} is a {type(value).__name__}, not a tensor')
  return obj


def _read_zip(file):
  """(tensor refs, {storage key: flat array}) of a zip-format file (an open binary file)."""
  with zipfile.ZipFile(file) as archive:
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
  """(object, {storage key: flat array}) of a legacy-format stream; the arrays view `data`."""
  view = memoryview(data)
  with io.BytesIO(data) as f:
    if _unpickle(f) != _LEGACY_MAGIC:
      raise ValueError('it is neither a zip archive nor a legacy torch.save stream (wrong magic number)')
    if _unpickle(f) != _LEGACY_PROTOCOL:
      raise ValueError(f'unsupported legacy protocol (expected {_LEGACY_PROTOCOL})')
    if not _unpickle(f).get('little_endian'):
      raise ValueError('only little-endian files are supported')
    unpickler = _RestrictedUnpickler(f, _TENSOR_GLOBALS)
    obj = unpickler.load()
    dtypes = unpickler.storage_dtypes
    storages = {}
    for key in _unpickle(f):
      if key not in dtypes:
        raise ValueError(f'storage {key} is not named by the object')
      header = f.read(8)
      if len(header) != 8:
        raise ValueError(f'storage {key} is truncated')
      count, start = int(np.frombuffer(header, '<i8')[0]), f.tell()
      end = start + count * dtypes[key].itemsize
      if count < 0 or end > len(data):
        raise ValueError(f'storage {key} is truncated')
      storages[key] = np.frombuffer(view[start:end], dtypes[key])
      f.seek(end)
    return obj, storages


def _materialize(ref: _TensorRef, storages: dict, copy: bool = True) -> np.ndarray:
  """The strided view ref of its flat storage, after checking that it lies inside it: a copy, or with copy=False
  the storage itself (read-only) where the tensor is all of it, contiguous."""
  flat = storages[ref.storage.key] if isinstance(ref.storage, _Storage) else ref.storage
  if not isinstance(flat, np.ndarray):
    raise ValueError(f'a tensor whose storage is a {type(flat).__name__}')
  if not ref.shape or min(ref.shape) > 0:
    last = ref.offset + sum((n - 1) * s for n, s in zip(ref.shape, ref.stride))
    if ref.offset < 0 or min(ref.stride, default=0) < 0 or last >= len(flat):
      raise ValueError('a tensor view reaches outside its storage')
  size = int(np.prod(ref.shape, dtype=np.int64))
  contiguous = tuple(ref.stride) == tuple(int(np.prod(ref.shape[i + 1:], dtype=np.int64))
                                         for i in range(len(ref.shape)))
  if not copy and ref.offset == 0 and size == len(flat) and contiguous:
    return flat.reshape(ref.shape)
  view = np.lib.stride_tricks.as_strided(flat[ref.offset:], ref.shape, [s * flat.itemsize for s in ref.stride])
  return view.copy()


def _cause(e: Exception) -> str:
  return ' '.join(str(e).split()) or type(e).__name__


def load_state_dict(path) -> dict[str, np.ndarray]:
  """Reads the torch.save file at `path` (zip or legacy format; any epath) into {name: numpy array}, in file order.

  Raises:
    FileNotFoundError: no file at `path`.
    ValueError: the file is not a torch.save file of a dict of tensors (one line, naming the cause).
  """
  path = epath.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f'No file at {path}.')
  try:
    with path.open('rb') as f:
      if zipfile.is_zipfile(f):  # read member by member, not whole
        f.seek(0)
        refs, storages = _read_zip(f)
      else:
        f.seek(0)
        obj, storages = _read_legacy(f.read())
        refs = _tensor_refs(obj)
    return {name: _materialize(ref, storages) for name, ref in refs.items()}
  except Exception as e:  # Pickle, zip, IO and layout errors alike.
    raise ValueError(f'{path} is not a readable PyTorch state dict: {_cause(e)}') from e


def load_module_pickle(path):
  """The object of a plain pickle of torch modules at `path` (e.g. an EDM network snapshot), with tensors as
  numpy arrays (read-only where a tensor is its whole storage), modules as PersistentObject / Record states; no
  code from the file is imported or run.

  Raises:
    FileNotFoundError: no file at `path`.
    ValueError: the file is not such a pickle, or it names a global outside the allowed ones (one line).
  """
  path = epath.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f'No file at {path}.')
  try:
    with path.open('rb') as f:  # streamed: each storage's bytes are read once, into the object they become
      obj = _RestrictedUnpickler(f, _MODULE_GLOBALS, records=True).load()
    return _materialize_tree(obj)
  except Exception as e:
    raise ValueError(f'{path} is not a readable pickle of PyTorch modules: {_cause(e)}') from e


def _materialize_tree(obj):
  """obj with every tensor reference replaced by its array (in dicts, lists, tuples, records and persistent
  objects)."""
  if isinstance(obj, _TensorRef):
    return _materialize(obj, {}, copy=False)
  if isinstance(obj, PersistentObject):
    return PersistentObject(obj.class_name, _materialize_tree(obj.state))
  if isinstance(obj, Record):
    obj.state, obj.items = _materialize_tree(obj.state), _materialize_tree(obj.items)
    obj.entries = _materialize_tree(obj.entries)
    return obj
  if isinstance(obj, dict):
    return type(obj)((k, _materialize_tree(v)) for k, v in obj.items())
  if isinstance(obj, (list, tuple)) and not isinstance(obj, (_Storage,)):
    return type(obj)(_materialize_tree(v) for v in obj)
  return obj


def module_state(obj) -> dict:
  """The attributes (`__dict__`) of a module object of a module pickle (a PersistentObject or a Record)."""
  state = obj.state if isinstance(obj, (PersistentObject, Record)) else None
  if isinstance(state, tuple) and len(state) == 2 and isinstance(state[1], dict):  # (dict state, slot state)
    state = {**(state[0] or {}), **state[1]}
  if not isinstance(state, dict):
    raise ValueError(f'a {type(obj).__name__} without module state')
  return state


def module_state_dict(obj, prefix: str = '') -> dict[str, np.ndarray]:
  """{name: array} of a module object's parameters and buffers and those of its submodules, named as torch's
  `state_dict()` names them ('model.enc.32x32_conv.weight'); None entries (unset buffers) are left out."""
  state = module_state(obj)
  out, transient = {}, state.get('_non_persistent_buffers_set') or ()
  for group in ('_parameters', '_buffers'):
    for name, value in (state.get(group) or {}).items():
      if value is not None and not (group == '_buffers' and name in transient):
        if not isinstance(value, np.ndarray):
          raise ValueError(f'{prefix}{name} is a {type(value).__name__}, not a tensor')
        out[prefix + name] = value
  for name, child in (state.get('_modules') or {}).items():
    if child is not None:
      out.update(module_state_dict(child, f'{prefix}{name}.'))
  return out
