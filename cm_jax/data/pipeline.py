"""The resumable, per-host order in which records are read.

Global batch `step` holds the sample positions p = step * B + j, j < B. The
position falls in epoch e = p // n at offset p % n, and reads record
permutation_e[p % n], where permutation_e is a fresh permutation of the n
records seeded by (seed, e). The batch is therefore a pure function of
(seed, step): a run resumed at step k sees exactly the batches it would have
seen, and each process reads its contiguous slice of every global batch.
"""

import collections
from collections.abc import Callable, Iterator
from concurrent import futures
import functools
import itertools
import sys

from absl import flags
import grain
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


def _read_process_batch(
    source: source_lib.Source,
    seed: int,
    global_batch_size: int,
    process_index: int,
    process_count: int,
    step: int,
) -> dict[str, np.ndarray]:
  """Reads and decodes this process's slice of global batch `step`."""
  indices = process_batch_indices(
      seed,
      step,
      global_batch_size,
      len(source),
      process_index,
      process_count,
  )
  return source.get(indices)


def _read_in_workers(
    read: Callable[[int], dict[str, np.ndarray]], start_step: int, workers: int
) -> grain.DatasetIterator:
  """Returns read(start_step), read(start_step + 1), ... from worker processes.

  grain gives worker i the steps start_step + i + j * workers (j = 0, 1, ...)
  and takes their outputs round-robin, so the batches come in step order.
  Each worker reads one batch at a time (no reader threads: the decode holds
  the GIL) and holds one finished batch in its output buffer. The steps end
  at sys.maxsize, i.e. never: a grain MapDataset needs a length but computes
  elements only when asked, and the trainer does not know its last step.
  """
  # grain 0.2.18 reads this absl flag even in a program that parsed no absl
  # flags, where reading it raises (grain issue 1355, fixed after 0.2.18);
  # marking it present makes the read return its default, False.
  if not flags.FLAGS.is_parsed():
    flags.FLAGS['grain_enable_multiprocess_worker_profiling'].present = True
  steps = grain.MapDataset.range(start_step, sys.maxsize).map(read)
  return iter(
      steps.to_iter_dataset(grain.ReadOptions(num_threads=0)).mp_prefetch(
          grain.MultiprocessingOptions(num_workers=workers)
      )
  )


class BatchIterator:
  """Yields global batches for steps start_step, start_step + 1, ...

  Each batch is a dict of `jax.Array`s laid out by `sharding` (leading axis
  sharded), assembled from this process's slice. A background thread takes
  this process's slices in step order, from the source itself (workers=0) or
  from `workers` grain worker processes that read and decode them in
  parallel, and transfers up to `prefetch` batches ahead. The batches are the
  same, bit for bit, whatever `workers` and the timing. `next_step` is the
  step of the next batch to be yielded: store it in a checkpoint and pass it
  back as `start_step`. A read error is raised by `next` (again on each later
  call). Call `close()` (or use the iterator as a context manager) when done.
  The source must be picklable when workers > 0.
  """

  def __init__(
      self,
      source: source_lib.Source,
      global_batch_size: int,
      seed: int,
      start_step: int,
      sharding: jax.sharding.NamedSharding,
      prefetch: int = 2,
      workers: int = 0,
  ):
    if prefetch < 1:
      raise ValueError(f'prefetch must be at least 1; got {prefetch}.')
    if workers < 0:
      raise ValueError(f'workers must be at least 0; got {workers}.')
    read = functools.partial(
        _read_process_batch,
        source,
        seed,
        global_batch_size,
        jax.process_index(),
        jax.process_count(),
    )
    # This process's slices of steps start_step, ...; only the thread reads it.
    self._local: Iterator[dict[str, np.ndarray]] = (
        _read_in_workers(read, start_step, workers)
        if workers
        else map(read, itertools.count(start_step))
    )
    self._sharding = sharding
    self._prefetch = prefetch
    self._executor = futures.ThreadPoolExecutor(
        max_workers=1, thread_name_prefix='batch_prefetch'
    )
    self._pending = collections.deque()  # Futures of steps next_step, ...
    self.next_step = start_step

  def _load(self) -> dict[str, jax.Array]:
    """Takes the next local slice and makes global arrays of it."""
    local = next(self._local)
    return {
        key: jax.make_array_from_process_local_data(self._sharding, value)
        for key, value in local.items()
    }

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, jax.Array]:
    # One thread runs the loads in submission order, so the i-th pending
    # future holds step next_step + i.
    while len(self._pending) < self._prefetch:
      self._pending.append(self._executor.submit(self._load))
    batch = self._pending[0].result()  # A failed read stays at the head.
    self._pending.popleft()
    self.next_step += 1
    return batch

  def close(self):
    """Stops the prefetch thread and the workers; drops batches read ahead."""
    for future in self._pending:
      future.cancel()
    self._pending.clear()
    self._executor.shutdown(wait=True)
    if isinstance(self._local, grain.DatasetIterator):
      self._local.close()
    self._local = iter(())  # grain's iterators freed at exit print errors.

  def __enter__(self):
    return self

  def __exit__(self, *exc_info):
    self.close()
