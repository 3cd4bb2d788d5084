"""Input pipeline at pod scale: records/s one host reads and decodes with the project's pipeline, for ImageNet-64-sized
records in ArrayRecord, against what a train step needs per host.

  python benchmarks/input_pipeline.py [--records=20000] [--batch_per_host=1024] [--steps=20] [--workers=0,1,2] \
      [--handoff=uint8,float32] [--step_s=0.1446] [--data_dir=/tmp/cm_jax_input_bench]

Writes (once) a TFDS set of `records` random 64x64x3 uint8 images stored as PNG (as imagenet_resized/64x64 stores
them; noise compresses worse than photographs, so decoding is pessimistic here) with 1000-class labels, in
ArrayRecord, then reads it through the trainer's own path: data.tfds_source (tfds.data_source random access) and
data.pipeline.BatchIterator (the per-host slice of each global batch, decoded in its prefetch thread or, with
workers=k (data.workers), in k grain worker processes, made a global array). The batches hold the stored uint8
pixels, scaled to [-1, 1] on the devices in the train step (data/source.py); --handoff=float32 also times the
former hand-off, the same source scaled to float32 on the host (in the workers), 4x the bytes between processes and
onto the devices. Prints the median seconds per host batch for the source alone, then a row per hand-off and worker
count:
- read: seconds per host batch through the iterator read back to back (the mean over --steps batches after each
  worker's first batch: k workers deliver in bursts of k, so a median of single batches would not be the rate),
  records/s (and per worker process), and read/step = those seconds / the step time;
- wait: the iterator consumed as the trainer does, one batch per simulated step (the host sleeps --step_s while the
  device would run the step, as JAX's asynchronous dispatch lets it), and wait/step = the mean time `next` blocks per
  step / the step time: the input's share of the step, what the aim (under 0.02) is about.
The step time default is the CIFAR-10 iCT pre-flight's XLA estimate on v5p:2x2x1, 1024 images per host (BUILD_NOTES).
then the float32 / uint8 ratios of read and wait per worker count. The last line, `input: workers=<k>
records_per_s=<x> batch_s=<x> step_s=<x> share=<x.xxx>`, is the uint8 worker count with the least wait; share is its
wait/step.
"""

import dataclasses
import io
import pathlib
import time

from absl import app
from absl import flags
import jax
import ml_collections
import numpy as np
import PIL.Image
import tensorflow_datasets as tfds

from cm_jax import sharding
from cm_jax.data import pipeline
from cm_jax.data import source as source_lib
from cm_jax.data import tfds_source

_RECORDS = flags.DEFINE_integer('records', 20_000, 'Records in the synthetic set.')
_BATCH = flags.DEFINE_integer('batch_per_host', 1024, 'Records one host reads per step.')
_STEPS = flags.DEFINE_integer('steps', 20, 'Timed batches (after warm-up batches).')
_WORKERS = flags.DEFINE_list('workers', ['0'], 'Worker process counts to time (data.workers), e.g. 0,1,2.')
_HANDOFF = flags.DEFINE_list('handoff', ['uint8'], 'Image dtypes handed to the devices: uint8 (the pipeline\'s), '
                             'float32 (scaled on the host, as before).')
_STEP_S = flags.DEFINE_float('step_s', 0.1446, 'Train step time to compare with (seconds).')
_DATA_DIR = flags.DEFINE_string('data_dir', '/tmp/cm_jax_input_bench', 'Where the synthetic set is written.')


class CmJaxInputBench(tfds.core.GeneratorBasedBuilder):
  """Random 64x64x3 images as PNG with 1000-class labels, in ArrayRecord; registered as 'cm_jax_input_bench'."""
  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Benchmark data.'}
  NUM_RECORDS = 20_000

  def __init__(self, **kwargs):
    super().__init__(**dict(kwargs, file_format='array_record'))

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        'image': tfds.features.Image(shape=(64, 64, 3)), 'label': tfds.features.ClassLabel(num_classes=1000)}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {'train': self._generate_examples()}

  def _generate_examples(self):
    rng = np.random.default_rng(0)
    for i in range(self.NUM_RECORDS):
      png = io.BytesIO()
      PIL.Image.fromarray(rng.integers(0, 256, (64, 64, 3), np.uint8)).save(png, format='PNG')  # encoded here: TFDS
      png.seek(0)  # would need TensorFlow to encode an array
      yield i, {'image': png, 'label': int(rng.integers(1000))}


@dataclasses.dataclass(frozen=True)
class HostScaled:
  """A source whose images are scaled to float32 [-1, 1] where they are read (the hand-off before uint8 batches)."""
  source: tfds_source.TfdsSource
  dtype = np.dtype(np.float32)

  @property
  def shape(self):
    return self.source.shape

  def __len__(self):
    return len(self.source)

  def get(self, indices):
    batch = self.source.get(indices)
    return dict(batch, image=source_lib.to_model_range(batch['image']))


def _median_seconds(fn, steps: int) -> float:
  for _ in range(2):
    fn()
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def _wait_per_step(batches, workers: int, steps: int, step_s: float) -> float:
  """Mean seconds `next` blocks per step when each step takes `step_s` (slept: the device's time, host idle), after
  each worker's first batch and the iterator's prefetch. With step_s = 0 it is the seconds per batch read back to
  back (a mean: k workers deliver in bursts of k)."""
  for _ in range(workers + 2):
    jax.block_until_ready(next(batches))
  waits = []
  for _ in range(steps):
    start = time.perf_counter()
    jax.block_until_ready(next(batches))
    waits.append(time.perf_counter() - start)
    time.sleep(step_s)
  return float(np.mean(waits))


def main(argv):
  del argv
  data_dir = pathlib.Path(_DATA_DIR.value) / str(_RECORDS.value)
  CmJaxInputBench.NUM_RECORDS = _RECORDS.value
  CmJaxInputBench(data_dir=str(data_dir)).download_and_prepare()
  source = tfds_source.tfds_source(CmJaxInputBench.name, 'train', str(data_dir), 0)
  batch = _BATCH.value
  rng = np.random.default_rng(1)
  alone = _median_seconds(lambda: source.get(rng.choice(len(source), batch, replace=False)), _STEPS.value)
  print(f'source.get of {batch} records: {alone:.4f} s ({batch / alone:.0f} records/s)', flush=True)
  mesh = sharding.make_mesh(ml_collections.ConfigDict({'shape': {'data': -1}}), jax.devices()[:1])
  seconds, waits, step_s = {}, {}, _STEP_S.value
  for handoff in _HANDOFF.value:
    read_from = {'uint8': source, 'float32': HostScaled(source)}[handoff]
    for workers in map(int, _WORKERS.value):
      make = lambda: pipeline.BatchIterator(read_from, batch, 0, 0, sharding.batch_sharding(mesh), workers=workers)
      with make() as batches:
        seconds[handoff, workers] = _wait_per_step(batches, workers, _STEPS.value, 0.0)
      with make() as batches:
        waits[handoff, workers] = _wait_per_step(batches, workers, _STEPS.value, step_s)
      read, wait = seconds[handoff, workers], waits[handoff, workers]
      per_worker = f', {batch / read / workers:.0f} per worker process' if workers else ''
      print(f'BatchIterator, {handoff} batches, workers={workers}, {batch} records per host batch: read {read:.4f} s '
            f'({batch / read:.0f} records/s{per_worker}), read/step {read / step_s:.3f}; wait {wait:.4f} s per step, '
            f'wait/step {wait / step_s:.3f}', flush=True)
  for workers in map(int, _WORKERS.value):
    if ('float32', workers) in seconds and ('uint8', workers) in seconds:
      read = seconds['float32', workers] / seconds['uint8', workers]
      wait = waits['float32', workers] / max(waits['uint8', workers], 1e-9)
      print(f'workers={workers}: float32 / uint8 hand-off: read {read:.2f}x, wait {wait:.2f}x')
  best = min((k for k in waits if k[0] == 'uint8'), key=waits.get, default=None)
  if best:
    print(f'input: workers={best[1]} records_per_s={batch / seconds[best]:.0f} batch_s={seconds[best]:.4f} '
          f'step_s={step_s} share={waits[best] / step_s:.3f}')


if __name__ == '__main__':
  app.run(main)
