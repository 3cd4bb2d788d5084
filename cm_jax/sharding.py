"""Device mesh and partition rules (what `pjit` became: `jax.jit` with NamedShardings).

The mesh comes from `config.mesh.shape`, an ordered mapping axis name -> size where -1 means "the remaining
devices". Parameters, EMA copies, target parameters and optimiser state are all sharded by the same regex
rules on their '/'-joined tree path; a leaf smaller than `min_size` elements, or one no rule matches, is
replicated. The batch's leading axis is split over every mesh axis.
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
  parts = []
  for key in path:
    for attr in ('key', 'name', 'idx'):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
  return '/'.join(parts)


def partition_spec(path: str, shape, rules, min_size: int) -> P:
  """The first rule whose regex is found in `path` gives the spec; small or unmatched leaves are replicated."""
  if int(np.prod(shape)) < min_size:
    return P()
  for pattern, spec in rules:
    if re.search(pattern, path):
      return P(*spec)
  return P()


def tree_shardings(abstract_tree, mesh, rules=(), min_size: int = 0):
  """NamedShardings for every leaf of an abstract pytree (e.g. the train state from jax.eval_shape)."""
  def one(path, leaf):
    return NamedSharding(mesh, partition_spec(tree_path(path), np.shape(leaf), rules, min_size))
  return jax.tree_util.tree_map_with_path(one, abstract_tree)
