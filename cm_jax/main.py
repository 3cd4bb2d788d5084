"""Command line: python -m cm_jax.main --config=configs/NAME.py[:arg] --workdir=DIR --mode=train|sample|eval|encode.

Config fields are overridden with --config.key=value; an unknown key stops the run before any work.
A multi-process run joins its processes first (cm_jax/distributed.py: the --coordinator_address,
--num_processes and --process_id flags, CM_JAX_* variables, or the TPU VM / Slurm cluster). A SIGTERM saves
a checkpoint at a step all processes agree on and exits 0; rerunning the command resumes there.
"""

import functools
import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from cm_jax import checkpoint
from cm_jax import console
from cm_jax import distributed

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file.', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory: checkpoints, event files, samples, config.')
_MODE = flags.DEFINE_enum('mode', 'train', ['train', 'sample', 'eval', 'encode'],
                          'What to do (encode: write config.latent.cache, a latent run\'s pre-encoded data).')
_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', None,
    f'host:port of process 0 of a multi-process run (else ${distributed.ENV_COORDINATOR}; detected on TPU VMs, Slurm).')
_NUM_PROCESSES = flags.DEFINE_integer(
    'num_processes', None, f'Processes in the run (else ${distributed.ENV_NUM_PROCESSES}).')
_PROCESS_ID = flags.DEFINE_integer(
    'process_id', None, f'This process: 0 .. num_processes - 1 (else ${distributed.ENV_PROCESS_ID}).')
flags.mark_flags_as_required(['config', 'workdir'])

# Errors caused by the user's input: reported in one line, exit status 1.
_USER_ERRORS = (ValueError, FileNotFoundError, checkpoint.CheckpointError, FloatingPointError)


def _run(mode, config, workdir):
  """Joins the run's processes (before devices start), sends the logs to the workdir, then trains, samples,
  evaluates or encodes."""
  distributed.initialize(distributed.plan(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value))
  distributed.stop_on_sigterm()
  from cm_jax import train  # pylint: disable=g-import-not-at-top
  console.route_logs(workdir)
  logging.info('Config:\n%s', config)
  name = config_flags.get_config_filename(flags.FLAGS['config'])
  modes = {'train': functools.partial(train.train_and_evaluate, name=name), 'sample': train.sample,
           'eval': train.evaluate, 'encode': train.encode}
  modes[mode](config, workdir)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  console.hold_logs()
  try:
    _run(_MODE.value, _CONFIG.value, _WORKDIR.value)
  except distributed.Preempted as e:
    logging.warning('%s', e)
    print(f'cm_jax: {e}', flush=True)
    if isinstance(e, distributed.PreemptedOutsideSteps):
      # Interrupted anywhere (a compilation, a library's threads): skip the interpreter's teardown, which can then
      # crash or wait on threads; nothing of this run is being written outside the training steps.
      logging.flush()
      sys.stderr.flush()
      os._exit(0)  # pylint: disable=protected-access
  except _USER_ERRORS as e:
    logging.exception('Stopped.')  # the traceback goes to the log file (and to stderr with --verbosity)
    print(f'cm_jax: error: {e}', file=sys.stderr, flush=True)
    sys.exit(1)


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


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
