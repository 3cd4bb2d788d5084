"""Reading back the resolved config that every run writes to its workdir."""

import json

from etils import epath
import ml_collections


def tuples(value):
  """JSON lists back to tuples, as the configs write them."""
  if isinstance(value, list):
    return tuple(tuples(v) for v in value)
  if isinstance(value, dict):
    return {k: tuples(v) for k, v in value.items()}
  return value


def load_run_config(workdir) -> ml_collections.ConfigDict:
  """The config.json of an earlier run, as a ConfigDict; a clear error naming the file when absent."""
  path = epath.Path(workdir) / 'config.json'
  if not path.exists():
    raise FileNotFoundError(f'{path} does not exist: is {workdir!r} the workdir of a cm_jax run?')
  try:
    return ml_collections.ConfigDict(tuples(json.loads(path.read_text())))
  except json.JSONDecodeError as e:
    raise ValueError(f'{path} is not valid JSON: {e}') from e
