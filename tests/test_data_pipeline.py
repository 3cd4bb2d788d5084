"""Tests of the resumable record order and the sharded batch iterator."""

import multiprocessing
import os
import re
import subprocess
import sys
import textwrap
import threading
import time

import jax
import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from cm_jax import data
from cm_jax import experiment
from cm_jax.data import digits
from cm_jax.data import image_folder
from cm_jax.data import tfds_source
from configs import base


def permutation(seed, epoch, n):
  return np.random.default_rng([seed, epoch]).permutation(n)


def data_sharding():
  mesh = jax.make_mesh(
      (jax.device_count(),), ('data',), axis_types=(jax.sharding.AxisType.Auto,)
  )
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))


def batch_size():
  """Returns a small global batch size that splits over the local devices."""
  return 4 * jax.device_count()


def toy_source(n=40):
  points = np.arange(2 * n, dtype=np.float32).reshape(n, 2)
  return data.ArraySource(points, np.arange(n, dtype=np.int32) % 3, 3)


def test_indices_are_a_pure_function_of_seed_and_step():
  first = data.global_batch_indices(
      seed=1, step=5, global_batch_size=8, num_records=30
  )
  again = data.global_batch_indices(
      seed=1, step=5, global_batch_size=8, num_records=30
  )
  assert first.dtype == np.int64 and first.shape == (8,)
  np.testing.assert_array_equal(first, again)
  other_seed = data.global_batch_indices(2, 5, 8, 30)
  other_step = data.global_batch_indices(1, 6, 8, 30)
  assert not np.array_equal(first, other_seed)
  assert not np.array_equal(first, other_step)


def test_indices_follow_the_per_epoch_permutation_across_a_boundary():
  # n = 10, B = 4: step 2 holds positions 8..11, two in each of epochs 0, 1.
  indices = data.global_batch_indices(7, 2, 4, 10)
  expected = np.concatenate(
      [permutation(7, 0, 10)[8:], permutation(7, 1, 10)[:2]]
  )
  np.testing.assert_array_equal(indices, expected)


def test_one_epoch_reads_every_record_once():
  n, batch_size = 24, 6
  epoch = np.concatenate(
      [data.global_batch_indices(3, step, batch_size, n) for step in range(4)]
  )
  np.testing.assert_array_equal(np.sort(epoch), np.arange(n))
  assert not np.array_equal(epoch, np.arange(n))  # Shuffled.
  # The next epoch is a different order of the same records.
  second = np.concatenate([
      data.global_batch_indices(3, step, batch_size, n) for step in range(4, 8)
  ])
  np.testing.assert_array_equal(np.sort(second), np.arange(n))
  assert not np.array_equal(epoch, second)


def test_batch_larger_than_the_data_set_spans_several_epochs():
  # n = 3, B = 7: two whole epochs, then the first record of epoch 2.
  indices = data.global_batch_indices(0, 0, 7, 3)
  assert sorted(indices[:3]) == sorted(indices[3:6]) == [0, 1, 2]
  assert indices[6] == permutation(0, 2, 3)[0]


@pytest.mark.parametrize(
    'bad', [dict(step=-1), dict(global_batch_size=0), dict(num_records=0)]
)
def test_invalid_arguments_are_rejected(bad):
  args = dict(seed=0, step=0, global_batch_size=4, num_records=10) | bad
  with pytest.raises(ValueError):
    data.global_batch_indices(**args)


def test_process_slices_are_disjoint_and_cover_each_epoch():
  n, batch_size, processes = 48, 8, 4
  per_process = {p: [] for p in range(processes)}
  for step in range(n // batch_size):
    slices = [
        data.process_batch_indices(5, step, batch_size, n, p, processes)
        for p in range(processes)
    ]
    assert all(len(s) == batch_size // processes for s in slices)
    np.testing.assert_array_equal(
        np.concatenate(slices),
        data.global_batch_indices(5, step, batch_size, n),
    )
    for p, s in enumerate(slices):
      per_process[p].append(s)
  reads = [set(np.concatenate(r)) for r in per_process.values()]
  for p in range(processes):
    for q in range(p + 1, processes):
      assert not reads[p] & reads[q]
  assert set().union(*reads) == set(range(n))


def test_batch_size_must_split_evenly_over_processes():
  with pytest.raises(
      ValueError, match='divisible by the number of processes 3'
  ):
    data.process_batch_indices(0, 0, 8, 100, 0, 3)


def test_iterator_yields_global_arrays_in_step_order():
  source, sharding = toy_source(), data_sharding()
  with data.BatchIterator(
      source, batch_size(), seed=2, start_step=0, sharding=sharding
  ) as it:
    for step in range(12):  # Crosses at least one epoch end of n = 40.
      assert it.next_step == step
      batch = next(it)
      expected = source.get(
          data.global_batch_indices(2, step, batch_size(), len(source))
      )
      for key in ('image', 'label'):
        assert isinstance(batch[key], jax.Array)
        assert batch[key].sharding == sharding
        np.testing.assert_array_equal(np.asarray(batch[key]), expected[key])
    assert it.next_step == 12


def test_iterator_resumes_exactly_where_it_stopped():
  source, sharding = toy_source(), data_sharding()
  with data.BatchIterator(source, batch_size(), 9, 0, sharding) as from_start:
    skipped = [next(from_start) for _ in range(7)][3:]
  with data.BatchIterator(source, batch_size(), 9, 3, sharding) as resumed:
    again = [next(resumed) for _ in range(4)]
  for a, b in zip(skipped, again):
    np.testing.assert_array_equal(
        np.asarray(a['image']), np.asarray(b['image'])
    )
    np.testing.assert_array_equal(
        np.asarray(a['label']), np.asarray(b['label'])
    )


def test_close_stops_the_prefetch_thread():
  it = data.BatchIterator(toy_source(), batch_size(), 0, 0, data_sharding())
  next(it)
  assert any(t.name.startswith('batch_prefetch') for t in threading.enumerate())
  it.close()
  assert not any(
      t.name.startswith('batch_prefetch') for t in threading.enumerate()
  )
  with pytest.raises(RuntimeError):
    next(it)


def test_iterator_shards_over_several_devices():
  """Runs in a subprocess so that the CPU backend can expose 4 devices."""
  script = textwrap.dedent("""
      import jax, numpy as np
      from cm_jax import data
      assert jax.device_count() == 4
      auto = (jax.sharding.AxisType.Auto,)
      mesh = jax.make_mesh((4,), ('data',), axis_types=auto)
      spec = jax.sharding.PartitionSpec('data')
      sharding = jax.sharding.NamedSharding(mesh, spec)
      points = np.arange(80, dtype=np.float32).reshape(40, 2)
      source = data.ArraySource(points, np.arange(40, dtype=np.int32), 40)
      with data.BatchIterator(source, 8, 1, 5, sharding) as it:
        batch = next(it)
      rows = source.get(data.global_batch_indices(1, 5, 8, 40))['image']
      shards = batch['image'].addressable_shards
      shards = sorted(shards, key=lambda s: s.index[0].start)
      assert len({s.device for s in shards}) == 4
      for i, shard in enumerate(shards):
        np.testing.assert_array_equal(shard.data, rows[2 * i : 2 * i + 2])
      print('ok')
  """)
  env = dict(
      os.environ,
      XLA_FLAGS='--xla_force_host_platform_device_count=4',
      JAX_PLATFORMS='cpu',
  )
  result = subprocess.run(
      [sys.executable, '-c', script],
      env=env,
      capture_output=True,
      text=True,
      timeout=120,
  )
  assert result.returncode == 0, result.stderr
  assert result.stdout.strip() == 'ok'


# --- Worker processes (grain) -------------------------------------------------


def expected_batch(source, seed, step):
  """This process's batch `step`, read from the source directly."""
  indices = data.process_batch_indices(
      seed, step, batch_size(), len(source), jax.process_index(),
      jax.process_count(),
  )
  return source.get(indices)


def assert_same_batches(batches, expected):
  assert len(batches) == len(expected)
  for batch, want in zip(batches, expected):
    assert batch.keys() == want.keys()
    for key in want:
      got = np.asarray(batch[key])
      assert got.dtype == want[key].dtype
      np.testing.assert_array_equal(got, want[key])


def new_worker_processes(before):
  return [p for p in multiprocessing.active_children() if p not in before]


def test_workers_read_bitwise_the_same_batches_and_exit_on_close():
  source, sharding = toy_source(), data_sharding()
  before = multiprocessing.active_children()
  with data.BatchIterator(source, batch_size(), 4, 0, sharding) as thread:
    in_thread = [next(thread) for _ in range(12)]  # Crosses epoch ends.
  with data.BatchIterator(
      source, batch_size(), 4, 0, sharding, workers=2
  ) as workers:
    in_workers = [next(workers) for _ in range(12)]
    assert workers.next_step == 12
    assert len(new_worker_processes(before)) == 2
  assert not new_worker_processes(before)
  expected = [expected_batch(source, 4, step) for step in range(12)]
  assert_same_batches(in_thread, expected)
  assert_same_batches(in_workers, expected)


def test_workers_resume_a_tfds_source_mid_run(tmp_path):
  """An ArrayRecord TFDS source (pickled to the workers), resumed at step 3."""
  digits.CmJaxDigits(data_dir=tmp_path).download_and_prepare()
  records = tfds.data_source(
      'cm_jax_digits', split='test', data_dir=tmp_path, download=False
  )
  source = tfds_source.TfdsSource('cm_jax_digits', records)
  sharding = data_sharding()
  with data.BatchIterator(source, batch_size(), 1, 0, sharding) as fresh:
    from_start = [next(fresh) for _ in range(8)]
  with data.BatchIterator(
      source, batch_size(), 1, 3, sharding, workers=2
  ) as resumed:
    again = [next(resumed) for _ in range(5)]
    assert resumed.next_step == 8
  assert_same_batches(again, from_start[3:])
  assert_same_batches(
      again, [expected_batch(source, 1, step) for step in range(3, 8)]
  )


def test_worker_read_error_is_raised_and_close_returns(tmp_path):
  """An image folder with a file truncated after listing: every batch (more
  records than the 4 files) reads it, and the worker's error names it."""
  folder = tmp_path / 'train' / 'a'
  folder.mkdir(parents=True)
  rng = np.random.default_rng(0)
  for i in range(4):
    Image.fromarray(rng.integers(0, 256, (4, 4, 3), np.uint8)).save(
        folder / f'{i}.png'
    )
  source = image_folder.image_folder_source(str(tmp_path), 'train', 0, '')
  broken = folder / '2.png'
  broken.write_bytes(broken.read_bytes()[:60])  # Header kept, pixels cut.
  before = multiprocessing.active_children()
  it = data.BatchIterator(
      source, batch_size(), 0, 5, data_sharding(), workers=2
  )
  message = re.escape(str(broken)) + ' is not a readable image .*: remove or'
  with pytest.raises(ValueError, match=message):
    next(it)
  with pytest.raises(ValueError, match=message):  # It stays at the head.
    next(it)
  assert it.next_step == 5
  start = time.monotonic()
  it.close()
  assert time.monotonic() - start < 10
  assert not new_worker_processes(before)


def test_negative_workers_are_refused():
  config = base.get_config()
  config.data.workers = -1
  with pytest.raises(
      ValueError, match=r'data\.workers=-1 must be at least 0 \(0: off\)'
  ):
    experiment.check_config(config)
  with pytest.raises(ValueError, match='workers must be at least 0; got -1'):
    data.BatchIterator(toy_source(), 4, 0, 0, data_sharding(), workers=-1)
