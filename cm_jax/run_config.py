"""A workdir belongs to one run: the keys that define a run, checked on resume, and the history of its configs.

A run's workdir keeps config.json (the newest resolved config) and config_history/<n>_step_<s>.json (each resolved
config the run has had, numbered, <s> the step it took over at). `check` compares a new config with config.json
before training writes anything; `write` records the new config once the restore has succeeded; `for_reading`
gives --mode=sample|eval|fid|edit|export the run's own definition whatever config file is passed.

What defines a run (DEFINES; a section name takes all its keys, less EXEMPT):
  seed; objective.*; model.* less the training rates and compute choices (EXEMPT); parameterization.*;
  data.name, split, path, image_size, num_records, seed, caption_key, resample (which examples, in which order);
  latent.autoencoder, pipeline, cache, normalization, posterior (the space); teacher.*; lora.*;
  optim.name, b1, b2, eps (what the moments in the optimiser state mean); ema.rates (each EMA is one average);
  train.batch_size (a checkpoint's data position counts batches: another size reads other examples).
  SWITCHES: optim.grad_clip, weight_decay, warmup_steps may change value, not turn on or off (that changes the
  optimiser state's tree).
Everything else may change on resume and is recorded: train.num_steps, log_every, nonfinite; checkpoint.*;
eval.*; sampling.*; edit.*; logging.*; mesh.* (Orbax restores onto the current mesh); optim.learning_rate;
init.checkpoint (a released model of the reading modes; --mode=train refuses it, cm_jax/releases.py);
data.data_dir, workers; latent.encode_batch_size, caption_dropout; model.dropout, label_dropout, dtype, remat,
attention_kernel; objective.jvp_dtype.
A key absent from an older config.json reads as its configs/base.py default (an objective's key: its default in
cm_jax/objectives/__init__.py).
"""

import json
import re

from etils import epath
import ml_collections

from cm_jax import config_lib
from cm_jax import objectives
from cm_jax import workdir as workdir_lib
from configs import base

DEFINES = ('seed', 'objective', 'model', 'parameterization', 'teacher', 'lora', 'ema.rates', 'train.batch_size',
           'data.name', 'data.split', 'data.path', 'data.image_size', 'data.num_records', 'data.seed',
           'data.caption_key', 'data.resample', 'latent.autoencoder', 'latent.pipeline', 'latent.cache',
           'latent.normalization', 'latent.posterior', 'optim.name', 'optim.b1', 'optim.b2', 'optim.eps')
SWITCHES = ('optim.grad_clip', 'optim.weight_decay', 'optim.warmup_steps')  # compared as on (> 0) or off
EXEMPT = ('model.dropout', 'model.label_dropout', 'model.dtype', 'model.remat', 'model.attention_kernel',
          'objective.jvp_dtype')
# The sections whose keys depend on their `name`: another name is reported alone.
NAMED = ('objective', 'model', 'parameterization')
# What --mode=sample|eval|fid|edit|export takes from the run: what builds and restores its state (not the data
# order: seed and train.batch_size stay the passed config's, as the sampling seed and batch; teacher.* too: where
# the teacher is from here, a relative path being relative to the command's directory, and read only by LoRA runs).
NOT_READ = ('seed', 'train.batch_size', 'teacher')
CONFIG = 'config.json'
HISTORY = 'config_history'
ABSENT = object()


def _flat(tree, prefix=()) -> dict:
  """{path tuple: leaf} of a JSON object; an empty object is a leaf."""
  if not isinstance(tree, dict) or not tree:
    return {prefix: tree}
  out = {}
  for k, v in tree.items():
    out.update(_flat(v, prefix + (k,)))
  return out


def _unflat(flat: dict) -> dict:
  out = {}
  for path, leaf in flat.items():
    node = out
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = leaf
  return out


def _json(config) -> dict:
  """A ConfigDict (or dict) in the form config.json holds it."""
  if isinstance(config, dict):
    return json.loads(json.dumps(config))
  return json.loads(config.to_json_best_effort(sort_keys=True))


_BASE = _flat(_json(base.get_config()))


def _under(path: tuple, keys) -> bool:
  name = '.'.join(path)
  return any(name == k or name.startswith(k + '.') for k in keys)


def _defines(path: tuple) -> bool:
  return _under(path, DEFINES + SWITCHES) and not _under(path, EXEMPT)


def _value(flat: dict, path: tuple):
  return flat.get(path, _BASE.get(path, ABSENT))


def _show(value) -> str:
  return '(unset)' if value is ABSENT else json.dumps(value)


def _compared(path: tuple, value):
  if _under(path, SWITCHES) and isinstance(value, (int, float)):
    return 'on' if value > 0 else 'off'
  return value


def _with_objective_defaults(tree: dict) -> dict:
  """A config's JSON with its objective's optional keys at their defaults where absent (objectives.with_defaults)."""
  objective = tree.get('objective')
  try:
    _, optional = objectives.objective_keys(objective['name'])
  except (TypeError, KeyError, ValueError):  # no objective, or an unknown one: compared as it is
    return tree
  return dict(tree, objective=dict(_json(optional), **objective))


def differences(saved, new, which=_defines) -> list[tuple[str, object, object]]:
  """(key, saved value, new value) of each key `which` selects where two configs differ (JSON values; ABSENT where
  a config lacks a key that configs/base.py and the objective's defaults do not declare). A different
  objective/model/parameterization name is reported without the keys of that section."""
  saved, new = (_flat(_with_objective_defaults(_json(c))) for c in (saved, new))
  out = []
  for path in sorted(set(saved) | set(new)):
    if not which(path):
      continue
    a, b = _value(saved, path), _value(new, path)
    if _compared(path, a) != _compared(path, b):
      out.append((path, a, b))
  renamed = {p[0] for p, _, _ in out if len(p) == 2 and p[0] in NAMED and p[1] == 'name'}
  return [('.'.join(p), a, b) for p, a, b in out if not (p[0] in renamed and p[1:] != ('name',))]


def _read(workdir):
  """The JSON of WORKDIR/config.json, or None when there is none."""
  path = epath.Path(workdir) / CONFIG
  if not path.exists():
    return None
  try:
    content = json.loads(path.read_text())
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(f'{path} is not the config of a cm_jax run ({type(e).__name__}: {e}); choose another '
                     '--workdir.') from e
  if not isinstance(content, dict):
    raise ValueError(f'{path} is not the config of a cm_jax run; choose another --workdir.')
  return content


def check(config, workdir) -> None:
  """Refuses a config that would train another run in `workdir` (the keys of DEFINES and SWITCHES differ from its
  config.json); only reads.

  Raises:
    ValueError: one line naming each differing key with both values, and how to start the new run elsewhere.
  """
  saved = _read(workdir)
  if saved is None:
    return
  found = differences(saved, config)
  if found:
    keys = '; '.join(f'{k} is {_show(a)} there, {_show(b)} here' for k, a, b in found)
    raise ValueError(f'--workdir={workdir} holds another run ({epath.Path(workdir) / CONFIG}): {keys}. A workdir '
                     'belongs to one run: train this config in a new --workdir (or resume that run with the settings '
                     f'of its {CONFIG}).')


def write(config, workdir, start_step: int) -> str:
  """Records `config` as the run's newest config: config.json, and a new config_history/ entry when it differs from
  the last one (a config.json from before the history becomes entry 0000_earlier.json). Call it on process 0, after
  `check` and the restore succeeded. Returns a console line naming the settings changed on resume ('' if none)."""
  workdir = epath.Path(workdir)
  text = config.to_json_best_effort(indent=2, sort_keys=True)
  history = workdir / HISTORY
  history.mkdir(parents=True, exist_ok=True)
  entries = sorted((p for p in history.glob('*.json') if re.match(r'\d{4}_', p.name)), key=lambda p: p.name)
  previous = _read(workdir)
  if not entries and previous is not None:
    workdir_lib.write_atomically(history / '0000_earlier.json', json.dumps(previous, indent=2, sort_keys=True))
    entries = [history / '0000_earlier.json']
  last = json.loads(entries[-1].read_text()) if entries else None
  line = ''
  if last != json.loads(text):
    entry = history / f'{len(entries):04d}_step_{start_step}.json'
    workdir_lib.write_atomically(entry, text)
    if last is not None:
      changed = differences(last, config, which=lambda p: True)
      line = ('cm_jax: settings changed on resume, recorded in ' + str(entry) + ': ' +
              ', '.join(f'{k} {_show(a)} -> {_show(b)}' for k, a, b in changed))
  workdir_lib.write_atomically(workdir / CONFIG, text)
  return line


def for_reading(config, workdir, mode: str):
  """(config, note): `config` with the run's own keys (DEFINES and SWITCHES less NOT_READ) from WORKDIR/config.json,
  so that --mode=`mode` builds and restores the network the run trained; `note` is a console line naming the keys
  that the passed config had otherwise ('' and `config` itself when they agree or the run has no config.json)."""
  saved = _read(workdir)
  if saved is None:
    return config, ''
  read = lambda p: _defines(p) and not _under(p, NOT_READ)
  found = differences(saved, config, which=read)
  if not found:
    return config, ''
  saved_flat, merged = _flat(saved), _flat(_json(config))
  renamed = {s for s in NAMED if _value(saved_flat, (s, 'name')) != _value(merged, (s, 'name'))}
  read_all = lambda p: read(p) or p[0] in renamed  # another network: its compute choices too
  for path in set(saved_flat) | set(merged):
    if not read_all(path):
      continue
    merged.pop(path, None)
    if path in saved_flat:
      merged[path] = saved_flat[path]
    elif path[0] not in renamed and path in _BASE:  # a key younger than the run: its default
      merged[path] = _BASE[path]
  keys = ', '.join(f'{k}={_show(a)} (passed: {_show(b)})' for k, a, b in found)
  note = (f'cm_jax: --mode={mode} reads the run as {epath.Path(workdir) / CONFIG} defines it, not as the config '
          f'passed: {keys}')
  return ml_collections.ConfigDict(config_lib.tuples(_unflat(merged))), note
