"""Device mesh and partition rules (what `pjit` became: `jax.jit` with NamedShardings).

The mesh comes from `config.mesh.shape`, an ordered mapping axis name -> size where -1 means "the remaining
devices". Parameters, EMA copies, target parameters and optimiser state are all sharded by the same regex
rules on their '/'-joined tree path (e.g. 'params/up_0/res_1/conv_0/kernel', 'ema/0/...', 'target/...',
'opt_state/1/0/mu/params/...'); a leaf smaller than `min_size` elements, or one no rule matches, is
replicated. A rule's spec names the leaf's trailing dimensions, as numpy broadcasting does: ('fsdp', None)
splits the input-feature axis of both a dense [in, out] and a conv [h, w, in, out] kernel. A sharded axis
must divide by its mesh axes' size; one that does not is an error naming the leaf. The batch's leading axis
is split over every mesh axis, so with shape {data: D, fsdp: F} each of the D * F devices takes a slice of
the batch and holds 1/F of every sharded leaf (fully sharded data parallelism).
"""

import re

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P


def make_mesh(mesh_config, devices=None) -> jax.sharding.Mesh:
  """A mesh over all devices with the configured named axes (Auto axis types: shardings come from jit)."""
  devices = jax.devices() if devices is None else devices
  names = tuple(mesh_config.shape.keys())
  sizes = [int(s) for s in mesh_config.shape.values()]
  fixed = int(np.prod([s for s in sizes if s != -1]))
  if sizes.count(-1) > 1:
    raise ValueError(f'mesh.shape {dict(mesh_config.shape)} has more than one -1 axis.')
  if len(devices) % fixed:
    raise ValueError(f'mesh.shape {dict(mesh_config.shape)} does not divide the {len(devices)} devices.')
  sizes = [len(devices) // fixed if s == -1 else s for s in sizes]
  if int(np.prod(sizes)) != len(devices):
    raise ValueError(f'mesh.shape {dict(mesh_config.shape)} -> {sizes} does not use all {len(devices)} devices.')
  return jax.make_mesh(tuple(sizes), names, axis_types=(jax.sharding.AxisType.Auto,) * len(names),
                       devices=devices)


def batch_sharding(mesh) -> NamedSharding:
  """Leading (batch) axis split over all mesh axes; the other axes replicated."""
  return NamedSharding(mesh, P(mesh.axis_names))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def check_batch_divides(global_batch_size: int, mesh) -> None:
  """Raises a clear error when the global batch cannot be split evenly over devices and processes."""
  for count, what in ((mesh.size, 'devices'), (jax.process_count(), 'processes')):
    if global_batch_size % count:
      raise ValueError(f'batch_size={global_batch_size} does not divide across the {count} {what}; '
                       f'choose a multiple of {count}.')


def tree_path(path) -> str:
  """'/'-joined names of a pytree key path, e.g. 'params/down_0/res_1/conv_0/kernel'."""
  return jax.tree_util.keystr(path, simple=True, separator='/')


def _axis_names(entry) -> tuple:
  """The mesh axes one spec entry names: None -> (), 'fsdp' -> ('fsdp',), ('data', 'fsdp') -> itself."""
  if entry is None:
    return ()
  return (entry,) if isinstance(entry, str) else tuple(entry)


def partition_spec(path: str, shape, rules, min_size: int, axis_sizes) -> P:
  """The first rule whose regex is found in `path` gives the spec; small or unmatched leaves are replicated.

  `axis_sizes` maps mesh axis names to sizes (`mesh.shape`). The spec is aligned with the trailing dimensions
  of `shape`, and each sharded dimension must divide by the product of its axes' sizes.
  """
  if int(np.prod(shape)) < min_size:
    return P()
  for pattern, spec in rules:
    if not re.search(pattern, path):
      continue
    names = [_axis_names(entry) for entry in spec]
    where = f'mesh.rules entry ({pattern!r}, {tuple(spec)}) for {path} of shape {tuple(shape)}'
    if len(names) > len(shape):
      raise ValueError(f'{where}: the spec has more entries than the leaf has dimensions.')
    names = [()] * (len(shape) - len(names)) + names
    for dim, axes in zip(shape, names):
      unknown = [a for a in axes if a not in axis_sizes]
      if unknown:
        raise ValueError(f'{where}: no mesh axis {unknown[0]!r} (mesh axes: {tuple(axis_sizes)}).')
      size = int(np.prod([axis_sizes[a] for a in axes]))
      if dim % size:
        raise ValueError(f'{where}: {size} devices on {axes} do not divide its dimension of size {dim}.')
    return P(*(None if not axes else axes[0] if len(axes) == 1 else axes for axes in names))
  return P()


def tree_shardings(abstract_tree, mesh, rules=(), min_size: int = 0):
  """NamedShardings for every leaf of an abstract pytree (e.g. the train state from jax.eval_shape)."""
  def one(path, leaf):
    return NamedSharding(mesh, partition_spec(tree_path(path), np.shape(leaf), rules, min_size, mesh.shape))
  return jax.tree_util.tree_map_with_path(one, abstract_tree)
