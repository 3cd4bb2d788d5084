"""The resumable, per-host order in which records are read.

Global batch `step` holds the sample positions p = step * B + j, j < B. The
position falls in epoch e = p // n at offset p % n, and reads record
permutation_e[p % n], where permutation_e is a fresh permutation of the n
records seeded by (seed, e). The batch is therefore a pure function of
(seed, step): a run resumed at step k sees exactly the batches it would have
seen, and each process reads its contiguous slice of every global batch.
"""

import collections
from concurrent import futures
import functools

import jax
import numpy as np

from cm_jax.data import source as source_lib


@functools.lru_cache(maxsize=4)
def _epoch_permutation(seed: int, epoch: int, num_records: int) -> np.ndarray:
  """Returns the (read-only) order of the records in one epoch."""
  permutation = np.random.default_rng([seed, epoch]).permutation(num_records)
  permutation.flags.writeable = False
  return permutation


def global_batch_indices(
    seed: int, step: int, global_batch_size: int, num_records: int
) -> np.ndarray:
  """Returns the int64 record indices of global batch number `step`."""
  if step < 0 or global_batch_size < 1 or num_records < 1:
    raise ValueError(
        'Need step >= 0, global_batch_size >= 1 and num_records >= 1; got'
        f' {step}, {global_batch_size} and {num_records}.'
    )
  positions = step * global_batch_size + np.arange(global_batch_size)
  epochs, offsets = np.divmod(positions, num_records)
  indices = np.empty(global_batch_size, np.int64)
  # A batch may straddle epoch boundaries; read each epoch's part in turn.
  for epoch in np.unique(epochs):
    in_epoch = epochs == epoch
    permutation = _epoch_permutation(seed, int(epoch), num_records)
    indices[in_epoch] = permutation[offsets[in_epoch]]
  return indices


def process_batch_indices(
    seed: int,
    step: int,
    global_batch_size: int,
    num_records: int,
    process_index: int,
    process_count: int,
) -> np.ndarray:
  """Returns this process's contiguous slice of global batch `step`."""
  if global_batch_size % process_count:
    raise ValueError(
        f'global_batch_size {global_batch_size} must be divisible by the'
        f' number of processes {process_count}.'
    )
  local_batch_size = global_batch_size // process_count
  start = process_index * local_batch_size
  indices = global_batch_indices(seed, step, global_batch_size, num_records)
  return indices[start : start + local_batch_size]


class BatchIterator:
  """Yields global batches for steps start_step, start_step + 1, ...

  Each batch is a dict of `jax.Array`s laid out by `sharding` (leading axis
  sharded), assembled from this process's slice. A background thread reads
  and transfers up to `prefetch` batches ahead; batches come out in step
  order whatever the timing. `next_step` is the step of the next batch to be
  yielded: store it in a checkpoint and pass it back as `start_step`.
  Call `close()` (or use the iterator as a context manager) when done.
  """

  def __init__(
      self,
      source: source_lib.Source,
      global_batch_size: int,
      seed: int,
      start_step: int,
      sharding: jax.sharding.NamedSharding,
      prefetch: int = 2,
  ):
    if prefetch < 1:
      raise ValueError(f'prefetch must be at least 1; got {prefetch}.')
    self._source = source
    self._global_batch_size = global_batch_size
    self._seed = seed
    self._sharding = sharding
    self._prefetch = prefetch
    self._executor = futures.ThreadPoolExecutor(
        max_workers=1, thread_name_prefix='batch_prefetch'
    )
    self._pending = collections.deque()  # Futures of steps next_step, ...
    self.next_step = start_step

  def _load(self, step: int) -> dict[str, jax.Array]:
    """Reads this process's part of batch `step` and makes global arrays."""
    indices = process_batch_indices(
        self._seed,
        step,
        self._global_batch_size,
        len(self._source),
        jax.process_index(),
        jax.process_count(),
    )
    local = self._source.get(indices)
    return {
        key: jax.make_array_from_process_local_data(self._sharding, value)
        for key, value in local.items()
    }

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, jax.Array]:
    while len(self._pending) < self._prefetch:
      step = self.next_step + len(self._pending)
      self._pending.append(self._executor.submit(self._load, step))
    batch = self._pending[0].result()  # A failed read stays at the head.
    self._pending.popleft()
    self.next_step += 1
    return batch

  def close(self):
    """Stops the prefetch thread and drops batches read ahead."""
    for future in self._pending:
      future.cancel()
    self._pending.clear()
    self._executor.shutdown(wait=True)

  def __enter__(self):
    return self

  def __exit__(self, *exc_info):
    self.close()
