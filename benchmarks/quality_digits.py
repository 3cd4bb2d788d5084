"""The small-data quality table: the digits teachers and every registered consistency objective, trained on digits.

  python benchmarks/quality_digits.py [--workdir=runs/quality_digits] [--objectives=ict,cd,ct,ect,sct,scd]

Trains configs/digits_<name>.py for each consistency objective in the registry that has a digits config, after the
teacher of its parameterisation (configs/digits_edm.py, or configs/digits_trigflow.py for sCT/sCD), with
teacher.workdir set to that teacher run: the table's teacher row, the distilled teacher, and the initialisation
where the config sets teacher.init. Runs resume from their workdir, so a rerun only evaluates. Prints the
digits-proxy Frechet distance at 1 and 2 steps next to the teacher's at 35 NFE, and each run's wall time.
"""

import importlib
import pathlib
import shutil
import time

from absl import app
from absl import flags
import jax

from cm_jax import objectives
from cm_jax import train

_WORKDIR = flags.DEFINE_string('workdir', 'runs/quality_digits', 'One subdirectory per trained model.')
_OBJECTIVES = flags.DEFINE_list('objectives', None, 'Consistency objectives to train (default: all registered).')

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / 'configs'
PROXY = 'proxy_classifier.msgpack'


def digits_config(name):
  """configs/digits_<name>.py's config, or None when the objective has no digits config."""
  if not (CONFIGS / f'digits_{name}.py').exists():
    return None
  return importlib.import_module(f'configs.digits_{name}').get_config()


def train_and_report(config, workdir: pathlib.Path, proxy_from=None):
  """Trains `config` (without its own end-of-run table), then returns (quality_report's {row: FD}, seconds)."""
  config.eval.proxy = False
  start = time.time()
  state = train.train_and_evaluate(config, workdir)
  seconds = time.time() - start
  if proxy_from is not None and not (workdir / PROXY).exists():
    shutil.copy(proxy_from / PROXY, workdir / PROXY)  # the same seeded classifier: trained once
  return train.quality_report(train.Experiment(config), state, None, workdir), seconds


def main(argv):
  del argv
  root = pathlib.Path(_WORKDIR.value)
  names = _OBJECTIVES.value or sorted(objectives._REGISTRY)  # pylint: disable=protected-access
  teachers, rows = {}, []  # parameterisation -> (workdir, 35-NFE FD)

  def teacher_of(parameterization):
    """The digits teacher of a parameterisation (digits_edm or digits_trigflow), trained on first use."""
    if parameterization not in teachers:
      name = parameterization
      fd, seconds = train_and_report(digits_config(name), root / name, root / 'edm' if teachers else None)
      teachers[parameterization] = (root / name, fd[f'{name} (EDM Heun)'])
      rows.append(f'| {name} teacher | {teachers[parameterization][1]:.3f} (35 NFE) | - | - | {seconds / 60:.1f} |')
    return teachers[parameterization]

  teacher_of('edm')  # the proxy classifier is trained once, in the first run
  for name in names:
    config = digits_config(name)
    if config is None:
      continue
    teacher_dir, teacher_fd = teacher_of(config.parameterization.name)
    config.teacher.workdir = str(teacher_dir)
    if objectives.make_objective(config, None).kind != 'consistency':
      continue
    fd, seconds = train_and_report(config, root / name, root / 'edm')
    one, two = fd[f'{name} (1-step)'], fd[f'{name} (2-step)']
    rows.append(f'| {name} | {one:.3f} | {two:.3f} | {two / teacher_fd:.2f} | {seconds / 60:.1f} |')
    print('\n'.join(rows), flush=True)
  if jax.process_index() == 0:
    print('\nDigits proxy Frechet distance (lower is better); ratio = 2-step FD / its teacher\'s FD at 35 NFE',
          flush=True)
    print('| model | 1-step FD | 2-step FD | 2-step / teacher | train minutes |\n|---|---|---|---|---|', flush=True)
    print('\n'.join(rows), flush=True)


if __name__ == '__main__':
  app.run(main)
