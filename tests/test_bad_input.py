"""A workdir that cannot serve the mode stops the run at start (cm_jax/workdir.py), in one line and with nothing
written."""

import json
import os

import pytest

from cm_jax import workdir
from helpers import run_main, tiny_cli_args, tiny_cli_config
from test_cli import _assert_one_clear_error


def _run_dir(path):
  """A workdir as a run leaves it: config.json of a cm_jax config, checkpoints/, samples/, tensorboard/, logs/."""
  path.mkdir()
  (path / 'config.json').write_text(tiny_cli_config().to_json_best_effort())
  for name in ('checkpoints', 'samples', 'tensorboard', 'logs'):
    (path / name).mkdir()
  return path


def _replace(name, kind):
  """Makes a good run in a path whose entry `name` is then a file ('file' or its text), a directory, or absent (None);
  returns the run's path."""
  def make(path):
    _run_dir(path)
    entry = path / name
    if entry.is_dir():
      entry.rmdir()
    elif entry.exists():
      entry.unlink()
    if kind == 'directory':
      entry.mkdir()
    elif kind is not None:
      entry.write_text('' if kind == 'file' else kind)
    return path
  return make


def _a_file(path):
  path.write_text('not a directory')
  return path


# case -> (make(path) -> the workdir to check, the mode, the error, a fragment of its line with {p} = the workdir)
BAD = {
    'a file': (_a_file, 'train', ValueError, '{p}: it is a file; choose a --workdir that is a writable directory'),
    'under a file': (lambda p: _a_file(p) / 'sub', 'train', ValueError, '{p}: {p.parent} is a file'),
    'checkpoints a file': (_replace('checkpoints', 'file'), 'train', ValueError,
                           '{p}/checkpoints is a file, where a cm_jax run keeps a directory'),
    'samples a file': (_replace('samples', 'file'), 'sample', ValueError, '{p}/samples is a file'),
    'logs a file': (_replace('logs', 'file'), 'eval', ValueError, '{p}/logs is a file'),
    'tensorboard a file': (_replace('tensorboard', 'file'), 'train', ValueError, '{p}/tensorboard is a file'),
    'config.json a directory': (_replace('config.json', 'directory'), 'train', ValueError,
                                '{p}/config.json is a directory, where a cm_jax run keeps a file'),
    'proxy classifier a directory': (_replace('proxy_classifier.msgpack', 'directory'), 'eval', ValueError,
                                     '{p}/proxy_classifier.msgpack is a directory'),
    'config.json not JSON': (_replace('config.json', 'lr = 0.1\n'), 'train', ValueError,
                             '{p}/config.json is not the config of a cm_jax run (JSONDecodeError: '),
    'config.json a JSON list': (_replace('config.json', '[1, 2]'), 'fid', ValueError, '(a JSON list, not an object)'),
    'config.json of something else': (_replace('config.json', json.dumps({'model': {}, 'lr': 0.1})), 'edit',
                                      ValueError, '(no data, objective, train section): {p} is not the workdir of a '
                                      'cm_jax run; choose another --workdir.'),
    'sample a missing run': (lambda p: p, 'sample', FileNotFoundError,
                             'No checkpoint in {p}/checkpoints: --mode=sample reads a trained run; train it first'),
    'eval a run without checkpoints': (_replace('checkpoints', None), 'eval', FileNotFoundError,
                                       'No checkpoint in {p}/checkpoints: --mode=eval'),
}


@pytest.mark.parametrize('case', sorted(BAD))
def test_a_workdir_that_cannot_serve_the_mode_is_refused(tmp_path, case):
  make, mode, error, fragment = BAD[case]
  path = make(tmp_path / 'run')
  before = sorted(str(p) for p in tmp_path.rglob('*'))
  with pytest.raises(error) as raised:
    workdir.check(str(path), mode)
  message = str(raised.value)
  assert fragment.format(p=path) in message and '\n' not in message, message
  assert sorted(str(p) for p in tmp_path.rglob('*')) == before  # nothing written


def test_a_workdir_without_write_permission_is_refused(tmp_path, monkeypatch):
  """(Permission bits do not stop root, which runs these tests: os.access answers as for another user.)"""
  real = os.access
  monkeypatch.setattr(os, 'access', lambda p, mode: real(p, mode) and str(p) != str(tmp_path))
  with pytest.raises(ValueError, match=f'cannot write the workdir {tmp_path}/new/run: {tmp_path} is not writable'):
    workdir.check(str(tmp_path / 'new' / 'run'), 'train')


@pytest.mark.parametrize('mode', ['train', 'sample', 'eval', 'fid', 'edit', 'encode'])
def test_a_run_and_a_new_directory_are_accepted(tmp_path, mode):
  workdir.check(str(_run_dir(tmp_path / 'run')), mode)
  if mode in ('train', 'encode'):
    workdir.check(str(tmp_path / 'new' / 'run'), mode)
    assert not (tmp_path / 'new').exists()


@pytest.mark.parametrize('case', ['a file', 'config.json a directory', 'sample a missing run'])
def test_the_command_line_stops_at_start_in_one_line(tmp_path, case):
  """Exit status 1, one `cm_jax: error:` line, and nothing written: not even the log file."""
  make, mode, _, fragment = BAD[case]
  path = make(tmp_path / 'run')
  before = sorted(str(p) for p in tmp_path.rglob('*'))
  result = run_main(*tiny_cli_args(path), f'--mode={mode}')
  _assert_one_clear_error(result, fragment.format(p=path))
  assert result.returncode == 1
  assert sorted(str(p) for p in tmp_path.rglob('*')) == before
