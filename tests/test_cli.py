"""`python -m cm_jax.main` end to end, and bad input stopping with one clear message and a non-zero exit."""

import signal

import pytest

import helpers
from helpers import ROOT
from helpers import run_main


TINY = ['--config.train.log_every=5', '--config.checkpoint.every_steps=10', '--config.sampling.grid_every=10',
        '--config.sampling.num_grid=16', '--config.eval.num_samples=64', '--config.model.hidden=32',
        '--config.model.depth=1']


@pytest.mark.slow
def test_default_experiment_end_to_end(tmp_path):
  """Teacher then iCT with the teacher row in the table; then --mode=sample on the iCT run.

  Runs from another directory with relative workdirs, as a user would.
  """
  teacher = run_main(f'--config={ROOT}/configs/digits_edm.py', '--workdir=edm', '--config.train.num_steps=10', *TINY,
                     '--config.eval.proxy=False', cwd=tmp_path)
  assert teacher.returncode == 0, teacher.stderr[-3000:]
  run = run_main(f'--config={ROOT}/configs/digits_ict.py', '--workdir=ict', '--config.train.num_steps=20',
                 '--config.teacher.workdir=edm', *TINY, cwd=tmp_path)
  assert run.returncode == 0, run.stderr[-3000:]
  assert 'steps/s' in run.stdout and 'ETA' in run.stdout
  # The console shows the run (at most 40 lines for both commands), the log file the rest.
  assert not teacher.stderr and not run.stderr
  assert len((teacher.stdout + run.stdout).splitlines()) <= 40, teacher.stdout + run.stdout
  assert run.stdout.startswith('cm_jax: ') and 'ict, mlp (' in run.stdout.splitlines()[0]
  log = (tmp_path / 'ict' / 'logs' / 'process_0.log').read_text()
  assert 'Total:' in log and 'checkpoint_manager' in log and '[20] ' in log  # parameter table, Orbax, metrics
  for row in ('teacher (EDM Heun) | 35 |', 'ict (1-step) | 1 |', 'ict (2-step) | 2 |'):
    assert row in run.stdout, run.stdout
  workdir = tmp_path / 'ict'
  assert (workdir / 'config.json').exists()
  assert sorted(p.name for p in (workdir / 'checkpoints').iterdir()) == ['10', '20']
  assert list((workdir / 'tensorboard').glob('events.out.tfevents.*'))
  assert (workdir / 'samples' / 'step_00000010.png').exists()

  sample = run_main('--config=configs/digits_ict.py', f'--workdir={workdir}', '--mode=sample', *TINY)
  assert sample.returncode == 0, sample.stderr[-3000:]
  assert (workdir / 'samples' / 'final_2_step.png').exists()


def _assert_one_clear_error(result, *fragments):
  assert result.returncode != 0
  lines = [l for l in result.stderr.splitlines() if l.startswith('cm_jax: error:')]
  assert len(lines) == 1, result.stderr[-3000:]
  for fragment in fragments:
    assert fragment in lines[0], lines[0]


def test_unknown_config_key(tmp_path):
  """Exit status 2, and the text reads plainly (no escaped quotes or newlines)."""
  result = run_main('--config=configs/digits_ict.py', f'--workdir={tmp_path}', '--config.train.num_stepz=3')
  assert result.returncode == 2 and result.stderr == (
      'cm_jax: error: bad flag, config file or config override: no config key \'num_stepz\' (Did you mean '
      '"num_steps" instead of "num_stepz"?)\n')
  assert not (tmp_path / 'checkpoints').exists()


def test_batch_that_does_not_divide_across_devices(tmp_path):
  result = run_main('--config=configs/digits_ict.py', f'--workdir={tmp_path}', '--config.train.batch_size=12',
                    devices=8)
  _assert_one_clear_error(result, 'batch_size=12', '8 devices')


def test_unknown_data_set_name(tmp_path):
  result = run_main('--config=configs/digits_ict.py', f'--workdir={tmp_path}', '--config.data.name=not_a_dataset')
  _assert_one_clear_error(result, 'not_a_dataset')


def test_unreadable_checkpoint_stops_and_is_left_intact(tmp_path):
  """A step directory whose files are corrupt: the run names it and stops; nothing is deleted."""
  train_args = ['--config=configs/digits_edm.py', f'--workdir={tmp_path}', '--config.train.num_steps=10', *TINY,
                '--config.eval.proxy=False', '--config.sampling.grid_every=0']
  assert run_main(*train_args).returncode == 0
  step_dir = tmp_path / 'checkpoints' / '10'
  for f in step_dir.rglob('*'):
    if f.is_file() and f.name != 'commit_success.txt' and f.parent.name != 'data':
      f.write_bytes(b'garbage')
  before = sorted(str(p) for p in step_dir.rglob('*'))
  result = run_main(*train_args[:2], '--config.train.num_steps=20', *train_args[3:])
  _assert_one_clear_error(result, 'No readable checkpoint', 'checkpoints')
  assert sorted(str(p) for p in step_dir.rglob('*')) == before


def test_missing_teacher_workdir(tmp_path):
  result = run_main('--config=configs/digits_ict.py', f'--workdir={tmp_path / "run"}',
                    f'--config.teacher.workdir={tmp_path / "nowhere"}')
  _assert_one_clear_error(result, 'nowhere')


@pytest.mark.parametrize('config, cause', [
    ('configs/no_such_config.py', "No such file or directory: 'configs/no_such_config.py'"),
    ('configs', "Is a directory: 'configs'"),
    ('BAD', 'bad.py, line 1: invalid syntax'),
    ('configs/digits_scd.py:nope', "Unknown digits_scd variant 'nope'")])
def test_a_config_file_that_does_not_load_is_one_line(tmp_path, config, cause):
  if config == 'BAD':
    config = tmp_path / 'bad.py'
    config.write_text('def get_config(:\n  return (\n')
  result = run_main(f'--config={config}', f'--workdir={tmp_path / "run"}')
  assert result.returncode == 2
  assert result.stderr.startswith('cm_jax: error: bad flag, config file or config override: ')
  assert len(result.stderr.splitlines()) == 1 and cause in result.stderr, result.stderr


def test_sigterm_during_start_up_exits_cleanly(tmp_path):
  """A SIGTERM before the first step (start-up, compilation) ends the run with exit 0 and the preemption line."""
  log = tmp_path / 'console.log'
  process = helpers.start_main(helpers.tiny_cli_args(tmp_path / 'run', train__num_steps=1_000_000), log)
  try:
    helpers.wait_until(lambda: (tmp_path / 'run' / 'logs' / 'process_0.log').exists(), [process], timeout=120,
                       what='the log file')
    process.send_signal(signal.SIGTERM)
    code = process.wait(timeout=120)
  finally:
    process.kill()
  text = log.read_text()
  assert code == 0 and 'cm_jax: Preempted' in text and 'Traceback' not in text, text[-2000:]
