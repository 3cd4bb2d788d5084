"""What the command lines share: absl flag parsing that reports a bad flag, config file or override in one line."""

import sys

from absl import flags


def _reason(error: BaseException) -> str:
  """The last line of what went wrong (a config file's own traceback ends with its exception)."""
  if isinstance(error, SyntaxError):
    return f'{error.filename}, line {error.lineno}: {error.msg}'
  if error.args and isinstance(error.args[0], KeyError):  # ml_collections wraps the KeyError of an unknown field
    error = error.args[0]
  if isinstance(error, KeyError) and error.args:  # an override of a key the config does not have
    key, *hint = [line.strip() for line in str(error.args[0]).splitlines() if line.strip()]
    return f'no config key {key}' + (f' ({" ".join(hint)})' if hint else '')
  lines = [line.strip() for line in str(error.__cause__ or error).splitlines() if line.strip()]
  return lines[-1] if lines else type(error).__name__


def parse_flags(argv):
  """absl flag parsing that reports a bad flag, config file or config override in one line (exit status 2).

  The config file is loaded here (ml_collections defers a failed load to the config's first use).
  """
  try:
    argv = flags.FLAGS(argv)
    flags.FLAGS.config.keys()
    return argv
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError, OSError, SyntaxError) as e:
    print(f'cm_jax: error: bad flag, config file or config override: {_reason(e)}', file=sys.stderr)
    sys.exit(2)
