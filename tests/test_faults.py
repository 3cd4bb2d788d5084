"""Faults: preemption (SIGTERM), processes killed while saving, unreadable checkpoints, another topology."""

import os
import pathlib
import re
import signal
import subprocess
import sys
import threading
import time

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cm_jax import checkpoint
from cm_jax import distributed
from cm_jax import experiment
from cm_jax import train
from launch import local_multiprocess
import helpers


def test_sigterm_saves_on_every_process_at_one_step_and_the_rerun_continues_the_losses(tmp_path):
  """2 processes; SIGTERM to process 1 only. Both save at the sync step and exit 0; the rerun resumes there."""
  steps = 100
  args = helpers.tiny_cli_args(tmp_path / 'run', train__num_steps=steps, checkpoint__every_steps=1000)
  processes = local_multiprocess.start(args, num_processes=2, devices_per_process=1, log_dir=tmp_path / 'first')
  try:
    helpers.wait_until(helpers.logged(tmp_path / 'first' / 'process_0.log', f'step 10/{steps}'), processes,
                           timeout=180, what='step 10')
  except BaseException:
    local_multiprocess.kill(processes)
    raise
  processes[1].send_signal(signal.SIGTERM)
  codes = local_multiprocess.wait(processes, timeout=120)
  logs = [(tmp_path / 'first' / f'process_{i}.log').read_text() for i in range(2)]
  assert codes == [0, 0], logs[0][-3000:] + logs[1][-3000:]
  saved = [re.findall(r'cm_jax: Preempted: saved step (\d+) to ', log) for log in logs]
  assert saved[0] == saved[1] and len(saved[0]) == 1, saved
  stop = int(saved[0][0])
  assert 10 <= stop < steps
  assert helpers.saved_steps(tmp_path / 'run') == [stop]

  processes = local_multiprocess.start(args, num_processes=2, devices_per_process=1, log_dir=tmp_path / 'second')
  codes = local_multiprocess.wait(processes, timeout=180)
  log = (tmp_path / 'second' / 'process_0.log').read_text()
  assert codes == [0, 0], log[-3000:]
  assert f'Resuming from step {stop} ' in log

  expected, _ = helpers.losses(helpers.tiny_cli_config(train__num_steps=steps), jax.devices()[:2], steps)
  got = helpers.scalars(tmp_path / 'run', 'loss')
  assert sorted(got) == list(range(1, steps + 1))
  np.testing.assert_allclose([got[s] for s in range(1, steps + 1)], expected, rtol=1e-4)


def test_sigterm_to_a_lone_process_saves_at_its_next_step(tmp_path):
  """In-process: the SIGTERM handler is installed for the loop, stops it with a checkpoint, then is removed."""
  config = helpers.tiny_config(num_steps=10_000)
  config.checkpoint.every_steps = 10_000
  handler = signal.getsignal(signal.SIGTERM)

  def preempt_once_watched():
    while not isinstance(getattr(signal.getsignal(signal.SIGTERM), '__self__', None), distributed.PreemptionWatch):
      time.sleep(0.005)
    signal.raise_signal(signal.SIGTERM)

  threading.Thread(target=preempt_once_watched, daemon=True).start()
  with pytest.raises(distributed.Preempted, match=r'saved step (\d+) to .*checkpoints/\1;') as stopped:
    train.train_and_evaluate(config, tmp_path, jax.devices()[:1])
  step = int(re.search(r'saved step (\d+)', str(stopped.value)).group(1))
  assert helpers.saved_steps(tmp_path) == [step] and step < 10_000
  assert signal.getsignal(signal.SIGTERM) is handler


# Runs cm_jax.main with Orbax's last act of a save, the rename of the finished temporary step directory, held for
# step $CM_JAX_TEST_HOLD_STEP: the path of that directory is written to $CM_JAX_TEST_MARKER, then the save waits.
_HOLD_A_SAVE = """
import asyncio, os, pathlib, runpy
from orbax.checkpoint._src.path import atomicity
rename = atomicity.AtomicRenameTemporaryPath.finalize
async def held(self):
  if self.get_final().name == os.environ['CM_JAX_TEST_HOLD_STEP']:
    pathlib.Path(os.environ['CM_JAX_TEST_MARKER']).write_text(str(self.get()))
    await asyncio.sleep(3600)
  await rename(self)
atomicity.AtomicRenameTemporaryPath.finalize = held
runpy.run_module('cm_jax.main', run_name='__main__', alter_sys=True)
"""


def _start_holding_a_save(args, log_path, step: int, marker) -> subprocess.Popen:
  """helpers.start_main with the save of `step` held just before its directory is renamed into place."""
  env = dict(os.environ, XLA_FLAGS=local_multiprocess.xla_flags(1, os.environ['XLA_FLAGS']), JAX_PLATFORMS='cpu',
             CM_JAX_TEST_HOLD_STEP=str(step), CM_JAX_TEST_MARKER=str(marker))
  with open(log_path, 'w') as log:
    return subprocess.Popen([sys.executable, '-c', _HOLD_A_SAVE, *args], cwd=helpers.ROOT, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)


def _assert_resumed_from(log, step, workdir):
  """The run whose console is `log` started afresh (step None) or resumed from `step`, and no run in `workdir` has
  met a partial checkpoint (its log file, WORKDIR/logs, is appended to by every run)."""
  assert 'Skipping unreadable' not in (workdir / 'logs' / 'process_0.log').read_text()
  assert re.findall(r'Resuming from step (\d+) ', log.read_text()) == ([] if step is None else [str(step)])


def test_sigkill_while_saving_never_leaves_a_checkpoint_that_is_chosen(tmp_path):
  """Kill -9 a run that saves every step while the save of a chosen step is complete in its temporary directory but
  not yet renamed (the save is held there), twice. Each restart resumes from the step before the killed save and
  removes its leftover; the final parameters equal an uninterrupted run's."""
  steps = 20
  run = tmp_path / 'run'
  args = helpers.tiny_cli_args(run, train__num_steps=steps, checkpoint__every_steps=1, checkpoint__max_to_keep=2)
  resumed_from, leftovers = None, []
  for held in (5, 12):
    log, marker = tmp_path / f'killed_at_{held}.log', tmp_path / f'holding_{held}'
    process = _start_holding_a_save(args, log, held, marker)
    try:
      helpers.wait_until(marker.exists, [process], timeout=120, what=f'the held save of step {held}')
      leftovers.append(pathlib.Path(marker.read_text()))
      assert leftovers[-1].is_dir() and max(helpers.saved_steps(run)) == held - 1
    finally:
      process.kill()
      process.wait()
    assert process.returncode == -signal.SIGKILL
    _assert_resumed_from(log, resumed_from, run)
    assert max(helpers.saved_steps(run)) == held - 1 and leftovers[-1].is_dir()
    resumed_from = held - 1

  log = tmp_path / 'final.log'
  final = helpers.start_main(args, log)
  try:
    assert final.wait(timeout=180) == 0, log.read_text()[-3000:]
  finally:
    final.kill()
  _assert_resumed_from(log, resumed_from, run)
  assert not any(p.exists() for p in leftovers) and helpers.saved_steps(run) == [steps - 1, steps]

  config = helpers.tiny_cli_config(train__num_steps=steps)
  _, uninterrupted = helpers.losses(config, jax.devices()[:1], steps)
  _, restored = experiment.restore_latest(config, run, jax.devices()[:1])
  chex.assert_trees_all_equal(restored, uninterrupted)


def test_unreadable_newest_checkpoint_is_skipped_named_and_set_aside(tmp_path, caplog):
  """Step 4's files are garbage: the trainer's Checkpointer restores step 2, warning with step 4's path, and
  moves step 4 aside, so that the resumed run can save step 4 again."""
  exp = experiment.Experiment(helpers.tiny_config(), jax.devices()[:1])
  state = exp.init_state()
  ckpt = checkpoint.Checkpointer(tmp_path, save_every=2, writer=True)
  for step in (2, 4):
    ckpt.save(step, state.replace(step=jnp.asarray(step, jnp.int32)), {'position': step, 'seed': 0})
  ckpt.wait()
  for f in (tmp_path / 'checkpoints' / '4' / 'state').rglob('*'):
    if f.is_file():
      f.write_bytes(b'garbage')

  restored, position = ckpt.restore(exp.abstract_state)
  assert int(restored.step) == 2 and position == {'position': 2, 'seed': 0}
  warnings = [r.getMessage() for r in caplog.records if 'unreadable checkpoint' in r.getMessage()]
  assert any(f'Skipping unreadable checkpoint {tmp_path / "checkpoints" / "4"}:' in w for w in warnings), warnings
  assert any(re.search(r'Moved the unreadable checkpoint .*/4 to .*/4\.unreadable-', w) for w in warnings)
  assert ckpt.steps() == [2] and len(list((tmp_path / 'checkpoints').glob('4.unreadable-*'))) == 1
  ckpt.save(4, restored, {'position': 4, 'seed': 0})
  ckpt.wait()
  assert ckpt.steps() == [2, 4]
  ckpt.close()


def test_checkpoint_restores_onto_another_topology_and_back(tmp_path):
  """8 devices with FSDP -> 2 devices replicated -> 8 devices with FSDP: identical values, each mesh's layout."""
  fsdp_config = helpers.tiny_config()
  fsdp_config.mesh.shape = dict(data=1, fsdp=8)
  fsdp_config.mesh.rules = ((r'kernel$', (None, 'fsdp')),)
  fsdp_config.mesh.min_size = 65  # dense_in [2, 32] and dense_out [32, 2] stay replicated
  fsdp = experiment.Experiment(fsdp_config, jax.devices()[:8])
  replicated = experiment.Experiment(helpers.tiny_config(), jax.devices()[:2])
  # Distinct values in every leaf (Adam's moments start at zero), so that a misplaced shard shows.
  state = jax.jit(lambda s: jax.tree.map(lambda x: x + jnp.arange(x.size, dtype=x.dtype).reshape(x.shape), s),
                  out_shardings=fsdp.state_sharding)(fsdp.init_state())
  ckpt = checkpoint.Checkpointer(tmp_path)

  for step, (source, target) in enumerate([(fsdp, replicated), (replicated, fsdp)], start=1):
    saved = jax.tree.map(np.asarray, state)
    ckpt.save(step, state, {'position': step, 'seed': 0}, force=True)
    ckpt.wait()
    state, _ = ckpt.restore(target.abstract_state, step)
    chex.assert_trees_all_equal(state, saved)
    for leaf, expected in zip(jax.tree.leaves(state), jax.tree.leaves(target.state_sharding), strict=True):
      assert leaf.sharding.is_equivalent_to(expected, leaf.ndim)
    shard = state.params['block_0']['dense_0']['kernel'].addressable_shards[0].data.shape
    assert shard == ((32, 4) if target is fsdp else (32, 32)), (source.mesh, target.mesh)
  ckpt.close()
