"""Faults: preemption (SIGTERM), processes killed while saving, unreadable checkpoints, another topology."""

import random
import re
import signal
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cm_jax import checkpoint
from cm_jax import distributed
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


def _assert_resumed_from(log, step, seed, workdir):
  """The run whose console is `log` started afresh (step None) or resumed from `step`, and no run in `workdir` has
  met a partial checkpoint (its log file, WORKDIR/logs, is appended to by every run)."""
  assert 'Skipping unreadable' not in (workdir / 'logs' / 'process_0.log').read_text(), f'seed {seed}'
  assert re.findall(r'Resuming from step (\d+) ', log.read_text()) == ([] if step is None else [str(step)]), (
      f'seed {seed}')


def test_sigkill_while_saving_never_leaves_a_checkpoint_that_is_chosen(tmp_path):
  """Kill -9 a run that saves every step, three times, at a random moment while a save is being written.

  Each restart resumes from the newest complete step; the final parameters equal an uninterrupted run's.
  """
  steps, seed = 40, int(time.time())
  rng = random.Random(seed)
  args = helpers.tiny_cli_args(tmp_path / 'run', train__num_steps=steps, checkpoint__every_steps=1,
                                   checkpoint__max_to_keep=2)
  directory = tmp_path / 'run' / 'checkpoints'
  newest = lambda: max(helpers.saved_steps(tmp_path / 'run'), default=None)
  saving = lambda: bool(list(directory.glob('*.orbax-checkpoint-tmp*')))
  resumed_from, killed_mid_save = None, 0
  for attempt in range(3):
    log = tmp_path / f'attempt_{attempt}.log'
    process = helpers.start_main(args, log)
    try:
      helpers.wait_until(lambda: (newest() or 0) > (resumed_from or 0), [process],
                             timeout=120, what=f'a checkpoint after step {resumed_from} (seed {seed})')
      time.sleep(rng.uniform(0.0, 0.3))
      helpers.wait_until(saving, [process], timeout=10, what=f'a save in progress (seed {seed})')
    finally:
      process.kill()
      process.wait()
    assert process.returncode == -signal.SIGKILL
    killed_mid_save += saving()
    _assert_resumed_from(log, resumed_from, seed, tmp_path / 'run')
    resumed_from = newest()

  log = tmp_path / 'final.log'
  final = helpers.start_main(args, log)
  try:
    assert final.wait(timeout=180) == 0, log.read_text()[-3000:]
  finally:
    final.kill()
  _assert_resumed_from(log, resumed_from, seed, tmp_path / 'run')
  assert killed_mid_save >= 1, f'no kill landed inside a save (seed {seed})'

  config = helpers.tiny_cli_config(train__num_steps=steps)
  _, uninterrupted = helpers.losses(config, jax.devices()[:1], steps)
  _, restored = train.restore_latest(config, tmp_path / 'run', jax.devices()[:1])
  helpers.assert_trees_equal(restored, uninterrupted)


def test_unreadable_newest_checkpoint_is_skipped_named_and_set_aside(tmp_path, caplog):
  """Step 4's files are garbage: the trainer's Checkpointer restores step 2, warning with step 4's path, and
  moves step 4 aside, so that the resumed run can save step 4 again."""
  exp = train.Experiment(helpers.tiny_config(), jax.devices()[:1])
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
  fsdp = train.Experiment(fsdp_config, jax.devices()[:8])
  replicated = train.Experiment(helpers.tiny_config(), jax.devices()[:2])
  # Distinct values in every leaf (Adam's moments start at zero), so that a misplaced shard shows.
  state = jax.jit(lambda s: jax.tree.map(lambda x: x + jnp.arange(x.size, dtype=x.dtype).reshape(x.shape), s),
                  out_shardings=fsdp.state_sharding)(fsdp.init_state())
  ckpt = checkpoint.Checkpointer(tmp_path)

  for step, (source, target) in enumerate([(fsdp, replicated), (replicated, fsdp)], start=1):
    saved = jax.tree.map(np.asarray, state)
    ckpt.save(step, state, {'position': step, 'seed': 0}, force=True)
    ckpt.wait()
    state, _ = ckpt.restore(target.abstract_state, step)
    helpers.assert_trees_equal(state, saved)
    for leaf, expected in zip(jax.tree.leaves(state), jax.tree.leaves(target.state_sharding), strict=True):
      assert leaf.sharding.is_equivalent_to(expected, leaf.ndim)
    shard = state.params['block_0']['dense_0']['kernel'].addressable_shards[0].data.shape
    assert shard == ((32, 4) if target is fsdp else (32, 32)), (source.mesh, target.mesh)
  ckpt.close()
