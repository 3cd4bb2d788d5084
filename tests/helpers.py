"""Helpers for tests that run trainings: the tiny experiment (in process or as CLI flags), loss curves, the CLI in
subprocesses, event files."""

import os
import pathlib
import struct
import subprocess
import sys
import time

import ml_collections
import numpy as np
from tensorboardX.proto import event_pb2

from cm_jax import experiment
from configs import toy2d_ict
from launch import local_multiprocess

ROOT = pathlib.Path(__file__).resolve().parents[1]

# The tiny experiment, seconds per run on a CPU: a 2-D GMM and a 1-block MLP, as --config.KEY=VALUE overrides of
# configs/toy2d_ict.py:gmm.
TINY = {'data.num_records': 512, 'model.hidden': 32, 'model.depth': 1, 'train.batch_size': 16,
        'train.log_every': 1, 'optim.warmup_steps': 3, 'optim.grad_clip': 1.0, 'sampling.num_grid': 16}


def tiny_cli_config(**overrides) -> ml_collections.ConfigDict:
  """configs/toy2d_ict.py:gmm with TINY and `overrides` (keys with '__' for '.') applied, as the CLI would."""
  config = toy2d_ict.get_config('gmm')
  config.update_from_flattened_dict(_overrides(overrides))
  return config


def tiny_cli_args(workdir, **overrides) -> list[str]:
  """The cm_jax.main arguments that give tiny_cli_config(**overrides) in `workdir`."""
  return ['--config=configs/toy2d_ict.py:gmm', f'--workdir={workdir}',
          *(f'--config.{k}={v}' for k, v in _overrides(overrides).items())]


def _overrides(overrides) -> dict:
  return dict(TINY, **{k.replace('__', '.'): v for k, v in overrides.items()})


def tiny_config(objective='ict', num_steps=12, batch_size=16) -> ml_collections.ConfigDict:
  """tiny_cli_config for in-process trainer tests: two EMAs, 16 evaluation samples, a checkpoint at half way."""
  c = tiny_cli_config(train__num_steps=num_steps, train__batch_size=batch_size, train__log_every=4,
                      checkpoint__every_steps=num_steps // 2, checkpoint__async_save=True, eval__num_samples=16)
  if objective == 'edm':
    c.objective = ml_collections.ConfigDict(dict(name='edm', p_mean=-1.2, p_std=1.2))
  c.ema.rates = (0.9, 0.5)
  return c


def losses(config, devices, num_steps: int):
  """(per-step losses, final state) of `num_steps` train steps in this process on `devices`."""
  exp = experiment.Experiment(config, devices)
  state, step_fn, out = exp.init_state(), exp.train_step(), []
  with exp.batches(0) as batches:
    for _ in range(num_steps):
      state, metrics = step_fn(state, next(batches), exp.frozen())
      out.append(float(metrics['loss']))
  return np.array(out), state


def run_main(*args, devices=1, timeout=600, cwd=ROOT) -> subprocess.CompletedProcess:
  """`python -m cm_jax.main ARGS` on `devices` simulated CPU devices, to completion, output captured."""
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             XLA_FLAGS=f'--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0')
  return subprocess.run([sys.executable, '-m', 'cm_jax.main', *args], cwd=cwd, env=env, capture_output=True,
                        text=True, timeout=timeout)


def start_main(args, log_path) -> subprocess.Popen:
  """`python -m cm_jax.main ARGS` on one CPU device in its own session, output to `log_path`.

  It compiles with this process's other XLA flags, so that it computes exactly what this process would.
  """
  env = dict(os.environ, XLA_FLAGS=local_multiprocess.xla_flags(1, os.environ['XLA_FLAGS']),
             JAX_PLATFORMS='cpu')
  with open(log_path, 'w') as log:
    return subprocess.Popen([sys.executable, '-m', 'cm_jax.main', *args], cwd=ROOT, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)


def wait_until(condition, processes, timeout: float, what: str) -> None:
  """Polls `condition()` until it holds; fails if one of `processes` ends first or `timeout` s pass."""
  deadline = time.monotonic() + timeout
  while not condition():
    if any(p.poll() is not None for p in processes):
      raise AssertionError(f'A process ended (exit codes {[p.poll() for p in processes]}) before {what}.')
    if time.monotonic() > deadline:
      raise TimeoutError(f'No {what} after {timeout} s.')
    time.sleep(0.01)


def logged(log_path, fragment: str):
  """A condition for wait_until: `fragment` is in the file at `log_path`."""
  return lambda: fragment in pathlib.Path(log_path).read_text()


def scalars(workdir, tag: str) -> dict[int, float]:
  """step -> value of one scalar in the TensorBoard event files of a run (later files win)."""
  return {step: value.simple_value for step, t, value in event_summaries(workdir) if t == tag}


def event_summaries(workdir, plugin: str = '') -> list:
  """(step, tag, Summary.Value) of every summary value in a run's TensorBoard event files (of one plugin if given)."""
  out = []
  for path in sorted((pathlib.Path(workdir) / 'tensorboard').glob('events.out.tfevents.*'),
                     key=lambda p: p.stat().st_mtime):
    data = path.read_bytes()
    offset = 0
    while offset < len(data):  # TFRecord: length (u64), crc (u32), payload, crc (u32)
      (length,) = struct.unpack('<Q', data[offset:offset + 8])
      event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
      offset += 16 + length
      out += [(event.step, v.tag, v) for v in event.summary.value
              if not plugin or v.metadata.plugin_data.plugin_name == plugin]
  return out


def wandb_records(run_file) -> list:
  """The protobuf records of an offline W&B run file (run-<id>.wandb): a 7-byte header, then a LevelDB-style log of
  32 KiB blocks whose chunks (crc u32, length u16, type u8: 1 full, 2 first, 3 middle, 4 last) make the records."""
  from wandb.proto import wandb_internal_pb2  # pylint: disable=g-import-not-at-top
  data = pathlib.Path(run_file).read_bytes()
  block, pos, chunks, records = 32768, 7, b'', []
  while pos + 7 <= len(data):
    if block - pos % block < 7:
      pos += block - pos % block
      continue
    _, length, kind = struct.unpack('<IHB', data[pos:pos + 7])
    chunks += data[pos + 7:pos + 7 + length]
    pos += 7 + length
    if kind in (1, 4):
      records.append(wandb_internal_pb2.Record.FromString(chunks))
      chunks = b''
  return records


def saved_steps(workdir) -> list[int]:
  """The complete checkpoint steps of a run (Orbax lists a step only once its save has finished)."""
  directory = pathlib.Path(workdir) / 'checkpoints'
  return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) if directory.is_dir() else []
