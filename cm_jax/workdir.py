"""The run directory (--workdir), checked before any work: what it must be, and what it may already hold.

A run keeps config.json (its newest resolved config), config_history/ (each config it has had: run_config.py),
checkpoints/, samples/, tensorboard/, logs/, fid/ (--mode=fid's reference statistics and partial moments), fid.json,
edits/ and proxy_classifier.msgpack there. --mode=train and --mode=encode create it; sample, eval, fid and edit read
a trained run, so it must hold checkpoints/. `check` only reads the file system. A workdir belongs to one run:
run_config.check refuses a train config that defines another run.
"""

import json
import os

from etils import epath

READS_A_RUN = ('sample', 'eval', 'fid', 'edit', 'export')
# What a run keeps in its workdir: name -> True for a directory, False for a file.
ENTRIES = {'config.json': False, 'config_history': True, 'checkpoints': True, 'samples': True, 'tensorboard': True,
           'logs': True, 'fid': True, 'fid.json': False, 'edits': True, 'proxy_classifier.msgpack': False}
CONFIG_SECTIONS = ('data', 'model', 'objective', 'train')  # sections of every cm_jax config (configs/base.py)


def check(workdir, mode: str, pipeline: str = '') -> None:
  """Stops a run whose `workdir` cannot serve `mode`, before anything is written. A text-to-image run's
  --mode=sample needs no checkpoint: it then samples its `pipeline` (config.latent.pipeline) itself.

  Raises:
    ValueError: the workdir (or a folder above it) is a file or not writable; an entry a run keeps there has the
      wrong kind (a file `checkpoints`, a directory `config.json`); config.json is not a cm_jax config.
    FileNotFoundError: a mode that reads a trained run (READS_A_RUN) finds no checkpoints/ there.
  """
  path = epath.Path(workdir)
  if writable_directory(path, 'the workdir', '--workdir') == path:
    _check_entries(path)
  if mode in READS_A_RUN and not (mode == 'sample' and pipeline) and not (path / 'checkpoints').is_dir():
    raise FileNotFoundError(f'No checkpoint in {path / "checkpoints"}: --mode={mode} reads a trained run; train it '
                            'first (--mode=train) or point --workdir at one.')


def writable_directory(path, what: str, setting: str) -> epath.Path:
  """Stops when the directory `path` cannot be written or made: it, or the nearest folder above it that exists, is a
  file, or that folder is not writable. Returns that nearest existing folder (`path` itself when it exists); `what`
  and `setting` name the directory and the setting that chose it in the message. Only reads the file system."""
  path = epath.Path(path)
  existing = path
  while not existing.exists() and existing.parent != existing:
    existing = existing.parent
  advice = f'choose a {setting} that is a writable directory (or a new one).'
  if not existing.is_dir():
    where = 'it is a file' if existing == path else f'{existing} is a file'
    raise ValueError(f'cannot write {what} {path}: {where}; {advice}')
  if '://' not in str(existing) and not os.access(existing, os.W_OK | os.X_OK):
    raise ValueError(f'cannot write {what} {path}: {existing} is not writable (permission denied); {advice}')
  return existing


def write_atomically(path, text: str) -> None:
  """Writes `text` to `path` through a temporary file renamed over it (readers see the old file or the new, never a
  part)."""
  path = epath.Path(path)
  tmp = path.parent / f'.{path.name}.tmp-{os.getpid()}'
  tmp.write_text(text)
  if '://' in str(path):
    tmp.rename(path)
  else:
    os.replace(tmp, path)


def _check_entries(path: epath.Path) -> None:
  """What the workdir holds is what a cm_jax run keeps there."""
  for name, is_dir in ENTRIES.items():
    entry = path / name
    if entry.exists() and entry.is_dir() != is_dir:
      raise ValueError(f'{entry} is a {"file" if is_dir else "directory"}, where a cm_jax run keeps a '
                       f'{"directory" if is_dir else "file"}: {path} is not the workdir of a cm_jax run; choose '
                       'another --workdir.')
  config = path / 'config.json'
  if config.exists():
    reason = _not_a_config(config)
    if reason:
      raise ValueError(f'{config} is not the config of a cm_jax run ({reason}): {path} is not the workdir of a '
                       'cm_jax run; choose another --workdir.')


def _not_a_config(config: epath.Path) -> str:
  """Why the file is not a config.json that cm_jax wrote ('' when it is one)."""
  try:
    content = json.loads(config.read_text())
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    return f'{type(e).__name__}: {e}'
  if not isinstance(content, dict):
    return f'a JSON {type(content).__name__}, not an object'
  missing = [s for s in CONFIG_SECTIONS if not isinstance(content.get(s), dict)]
  return f'no {", ".join(missing)} section' if missing else ''
