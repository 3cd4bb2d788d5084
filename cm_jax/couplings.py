"""Minibatch optimal-transport pairing of data and noise (improved latent CT, Dao et al. 2025).

Each step, the noise drawn for a batch is reordered so that data x_i meets noise z_pi(i), with pi the assignment that
minimises sum_i ||x_i - z_pi(i)||^2 (uniform marginals): noise goes to the data it is closest to, which lowers the
variance of the consistency-training target. The objective then uses the reordered noise at both noise levels.

  exact     `minibatch_ot`: scipy's linear_sum_assignment on the host, through a callback (O(B^3) on the CPU).
  sinkhorn  `sinkhorn_coupling`: entropic OT inside the compiled step (ott-jax's Sinkhorn); each data point takes the
            noise drawn from its row of the plan (data kept once each; a noise sample may repeat).

`couple` runs them on every device's shard of the batch (the reference code couples each GPU's local batch): inside
the train step, which sets the mesh as the abstract mesh, a shard_map over all mesh axes.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P
from scipy import optimize

METHODS = ('none', 'exact', 'sinkhorn')


def _flat(x):
  return jnp.reshape(x, (x.shape[0], -1))


def _assignment(x, z) -> np.ndarray:
  """The column j = pi(i) of each row of the minimum-cost assignment under the cost ||x_i - z_j||^2 (host)."""
  x = np.asarray(x, np.float64).reshape(len(x), -1)
  z = np.asarray(z, np.float64).reshape(len(z), -1)
  cost = (x**2).sum(1)[:, None] - 2.0 * x @ z.T + (z**2).sum(1)[None, :]
  rows, cols = optimize.linear_sum_assignment(cost)
  order = np.empty(len(x), np.int32)
  order[rows] = cols
  return order


def minibatch_ot(x0, noise):
  """`noise` reordered by the exact optimal assignment to `x0`: out[i] = noise[pi(i)], pi minimising
  sum_i ||x0_i - noise_pi(i)||^2. Works eagerly and inside jit (a host callback)."""
  order = jax.pure_callback(_assignment, jax.ShapeDtypeStruct(x0.shape[:1], jnp.int32), x0, noise)
  return noise[order]


def sinkhorn_coupling(x0, noise, rng, epsilon: float = 0.05):
  """Entropic OT: the Sinkhorn plan of cost ||x_i - z_j||^2 (epsilon relative to the mean cost), then for each i a
  j ~ plan[i, :] / sum_j plan[i, :]; returns noise[j_i]."""
  from ott.geometry import pointcloud  # pylint: disable=g-import-not-at-top
  from ott.problems.linear import linear_problem  # pylint: disable=g-import-not-at-top
  from ott.solvers.linear import sinkhorn  # pylint: disable=g-import-not-at-top
  geometry = pointcloud.PointCloud(_flat(x0), _flat(noise), epsilon=epsilon, relative_epsilon='mean')
  plan = sinkhorn.Sinkhorn()(linear_problem.LinearProblem(geometry)).matrix
  order = jax.random.categorical(rng, jnp.log(jnp.maximum(plan, 1e-30)), axis=-1)
  return noise[order]


def _device_index(axis_names):
  index = 0
  for name in axis_names:
    index = index * jax.lax.axis_size(name) + jax.lax.axis_index(name)
  return index


def check(method: str) -> None:
  """Fails on an unknown method name."""
  if method not in METHODS:
    raise ValueError(f'objective.coupling={method!r}; expected one of {METHODS}.')


def _paired(method, epsilon, x0, noise, rng):
  if x0.shape[0] < 2:
    raise ValueError(f'objective.coupling={method!r} pairs each device\'s shard of the batch, which holds '
                     f'{x0.shape[0]} sample here: use a batch of at least 2 per device.')
  return minibatch_ot(x0, noise) if method == 'exact' else sinkhorn_coupling(x0, noise, rng, epsilon)


def couple(method: str, x0, noise, rng, epsilon: float = 0.05):
  """`noise` paired with `x0` by `method` ('none', 'exact' or 'sinkhorn') on each device's shard of the batch."""
  check(method)
  if method == 'none':
    return noise
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or math.prod(mesh.axis_sizes) == 1:
    return _paired(method, epsilon, x0, noise, rng)
  spec = P(mesh.axis_names)
  local = lambda x, z, key: _paired(method, epsilon, x, z, jax.random.fold_in(key, _device_index(mesh.axis_names)))
  # check_vma=False: ott-jax's Sinkhorn loop does not mark its carry as varying over the mesh axes.
  return jax.shard_map(local, in_specs=(spec, spec, P()), out_specs=spec, check_vma=False)(x0, noise, rng)
