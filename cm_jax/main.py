"""Command line: python -m cm_jax.main --config=configs/NAME.py[:arg] --workdir=DIR
                                        [--mode=train|sample|eval|fid|edit|encode|export].

Config fields are overridden with --config.key=value; an unknown key stops the run before any work.
A multi-process run joins its processes first (cm_jax/distributed.py: the --coordinator_address,
--num_processes and --process_id flags, CM_JAX_* variables, or the TPU VM / Slurm cluster). A SIGTERM saves
a checkpoint at a step all processes agree on and exits 0; rerunning the command resumes there.
"""

import functools
import importlib
import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from cm_jax import checkpoint
from cm_jax import cli
from cm_jax import console
from cm_jax import distributed
from cm_jax import releases
from cm_jax import run_config
from cm_jax import workdir as workdir_lib

# --mode -> (module, function): each function(config, workdir, devices=None); imported after the processes joined.
MODES = {'train': ('cm_jax.train', 'train_and_evaluate'), 'sample': ('cm_jax.modes', 'sample'),
         'eval': ('cm_jax.modes', 'evaluate'), 'fid': ('cm_jax.evaluation.fid', 'run'),
         'edit': ('cm_jax.editing', 'run'), 'encode': ('cm_jax.modes', 'encode'), 'export': ('cm_jax.export', 'run')}

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file.', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory: checkpoints, event files, samples, config.')
_MODE = flags.DEFINE_enum('mode', 'train', list(MODES),
                          'What to do (fid: FID/IS of the newest checkpoint, config.eval.fid; edit: zero-shot editing, '
                          'config.edit; encode: write config.latent.cache, a latent run\'s pre-encoded data; export: '
                          'a text-to-image run as diffusers files in WORKDIR/export).')
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
  """Checks the workdir, joins the run's processes (before devices start), sends the logs to the workdir, then
  trains, samples, evaluates or encodes."""
  if config.get('init', {}).get('checkpoint'):  # the model is a released file (cm_jax/releases.py)
    releases.check_workdir(config, workdir, mode)
  else:
    workdir_lib.check(workdir, mode, config.latent.get('pipeline', ''))
  if mode == 'train':
    run_config.check(config, workdir)  # another run's workdir: refused before anything (the log too) is written
  distributed.initialize(distributed.plan(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value))
  distributed.stop_on_sigterm()
  console.route_logs(workdir)
  if mode in workdir_lib.READS_A_RUN:  # the model is the run's own (its config.json), whatever config is passed
    config, note = run_config.for_reading(config, workdir, mode)
    if note:
      console.say(note)
  logging.info('Config:\n%s', config)
  name = config_flags.get_config_filename(flags.FLAGS['config'])
  module, function = MODES[mode]
  run = getattr(importlib.import_module(module), function)  # after the processes joined: JAX starts here
  if mode == 'train':
    run = functools.partial(run, name=name)
  run(config, workdir)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  console.select_platforms()  # before JAX starts: libtpu searches no TPU on a host without one
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


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
