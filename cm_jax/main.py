"""Command line: python -m cm_jax.main --config=configs/NAME.py[:arg] --workdir=DIR --mode=train|sample|eval.

Config fields are overridden with --config.key=value; an unknown key stops the run before any work.
Multi-host runs call jax.distributed.initialize() first (see cm_jax/distributed.py).
"""

import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from cm_jax import checkpoint

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file.', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory: checkpoints, event files, samples, config.')
_MODE = flags.DEFINE_enum('mode', 'train', ['train', 'sample', 'eval'], 'What to do.')
flags.mark_flags_as_required(['config', 'workdir'])

# Errors caused by the user's input: reported in one line, exit status 1.
_USER_ERRORS = (ValueError, FileNotFoundError, checkpoint.CheckpointError, FloatingPointError)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  from cm_jax import train  # pylint: disable=g-import-not-at-top  (after flags: JAX starts here)
  config, workdir = _CONFIG.value, _WORKDIR.value
  logging.info('Config:\n%s', config)
  run = {'train': train.train_and_evaluate, 'sample': train.sample, 'eval': train.evaluate}[_MODE.value]
  try:
    run(config, workdir)
  except _USER_ERRORS as e:
    logging.exception('Stopped.')
    print(f'cm_jax: error: {e}', file=sys.stderr, flush=True)
    sys.exit(1)


if __name__ == '__main__':
  app.run(main)
