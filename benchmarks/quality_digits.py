"""The small-data quality tables: models trained on the 8x8 digits, scored by the digits-proxy Frechet distance.

  python benchmarks/quality_digits.py [--workdir=runs/quality_digits] [--family=pixel] [--objectives=ict,cd,...]
  python benchmarks/quality_digits.py --workdir=runs/quality_latent --family=latent
  python benchmarks/quality_digits.py --workdir=runs/quality_lct --family=lct [--variants=ict,full]

pixel: configs/digits_<name>.py for each pixel consistency objective (cd, ct, ict, ect, sct, scd), after the
  teacher of its parameterisation (digits_edm, or digits_trigflow for sCT/sCD), with teacher.workdir set to that
  teacher run; FD at 1 and 2 steps next to the teacher's at 35 NFE.
latent: the latent family in the space of digits_autoencoder: the DDPM teacher (DDIM at 50, 4 and 2 steps), LCD,
  LCM-LoRA (both from that teacher) and LCF (from the LCD run), each at 1, 2 and 4 LCM steps.
lct: the ablation of improved latent CT (configs/digits_lct.py variants) on the autoencoder's latent cache, at 1 and
  2 steps.
Every run resumes from its workdir, so a rerun only evaluates; decoded samples are scored (the autoencoder's own
reconstruction FD is printed when it finishes). Prints each run's wall time.
"""

import importlib
import pathlib
import time

from absl import app
from absl import flags
import jax
import numpy as np

from cm_jax import latents
from cm_jax import train
from cm_jax.data import load_digits
from cm_jax.evaluation import report

_WORKDIR = flags.DEFINE_string('workdir', 'runs/quality_digits', 'One subdirectory per trained model.')
_FAMILY = flags.DEFINE_enum('family', 'pixel', ['pixel', 'latent', 'lct'], 'Which table.')
# The consistency objectives on pixels; each has configs/digits_<name>.py and a teacher of its parameterisation.
PIXEL = ('cd', 'ct', 'ict', 'ect', 'sct', 'scd')
_OBJECTIVES = flags.DEFINE_list('objectives', list(PIXEL), 'pixel: consistency objectives to train.')
_VARIANTS = flags.DEFINE_list('variants', None, 'lct: ablation variants of configs/digits_lct.py (default: all).')

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / 'configs'
PROXY = 'proxy_classifier.msgpack'


def digits_config(name, arg=None):
  """configs/digits_<name>.py's config, or None when there is none."""
  if not (CONFIGS / f'digits_{name}.py').exists():
    return None
  get_config = importlib.import_module(f'configs.digits_{name}').get_config
  return get_config() if arg is None else get_config(arg)


class Table:
  """Trains runs under one root and scores them with one proxy classifier (root/proxy_classifier.msgpack, trained
  on first use); collects the table's rows."""

  def __init__(self, root: pathlib.Path):
    self.root, self.lines, self._proxy = root, [], None

  def proxy(self):
    if self._proxy is None:
      self.root.mkdir(parents=True, exist_ok=True)
      self._proxy = report.load_or_train_proxy(self.root / PROXY)
    return self._proxy

  def train(self, config, name):
    """Trains `config` in root/name (without its own end-of-run table); returns (experiment, state, minutes)."""
    config.eval.proxy = False
    start = time.time()
    state = train.train_and_evaluate(config, self.root / name)
    return train.Experiment(config), state, (time.time() - start) / 60

  def scores(self, exp, state, steps, teacher=None):
    """{steps: FD} of the run's first EMA sampled with its sampler at each step count."""
    c = exp.config
    return {n: self.proxy().frechet(exp.generate(state.ema[0], c.eval.num_samples, n, c.seed + 3, teacher))
            for n in steps}

  def row(self, *cells):
    self.lines.append('| ' + ' | '.join(str(c) for c in cells) + ' |')
    print('\n'.join(self.lines), flush=True)


def pixel_family(table: Table, names):
  """The consistency objectives on pixels, each after its teacher."""
  teachers = {}  # parameterisation -> (workdir, 35-NFE FD)

  def teacher_of(parameterization):
    if parameterization not in teachers:
      exp, state, minutes = table.train(digits_config(parameterization), parameterization)
      fd = table.scores(exp, state, exp.sampler.eval_steps(exp.config))
      teachers[parameterization] = (table.root / parameterization, next(iter(fd.values())))
      table.row(f'{parameterization} teacher', f'{teachers[parameterization][1]:.3f} (35 NFE)', '-', '-',
                f'{minutes:.1f}')
    return teachers[parameterization]

  teacher_of('edm')
  for name in names:
    if name not in PIXEL:
      raise ValueError(f'--objectives: {name!r} is not one of the pixel consistency objectives {PIXEL}.')
    config = digits_config(name)
    teacher_dir, teacher_fd = teacher_of(config.parameterization.name)
    config.teacher.workdir = str(teacher_dir)
    exp, state, minutes = table.train(config, name)
    fd = table.scores(exp, state, (1, 2))
    table.row(name, f'{fd[1]:.3f}', f'{fd[2]:.3f}', f'{fd[2] / teacher_fd:.2f}', f'{minutes:.1f}')
  return ('Digits proxy Frechet distance (lower is better); ratio = 2-step FD / its teacher\'s FD at 35 NFE',
          '| model | 1-step FD | 2-step FD | 2-step / teacher | train minutes |')


def _autoencoder(table: Table, columns: int):
  """Trains digits_autoencoder; its row is the FD of reconstructed held-out digits, a floor for every latent model."""
  _, _, minutes = table.train(digits_config('autoencoder'), 'autoencoder')
  autoencoder = latents.load_autoencoder(table.root / 'autoencoder')
  images, _ = load_digits('test')
  fd = table.proxy().frechet(np.clip(np.asarray(autoencoder.decode(autoencoder.encode(images))), -1.0, 1.0))
  table.row('autoencoder reconstructions (test split)', f'{fd:.3f}', *(['-'] * (columns - 3)), f'{minutes:.1f}')
  return str(table.root / 'autoencoder')


def latent_family(table: Table):
  """The guided latent DDPM teacher, LCD, LCM-LoRA and LCF in the digits autoencoder's latent space."""
  autoencoder = _autoencoder(table, 6)
  config = digits_config('latent_ddpm')
  config.latent.autoencoder = autoencoder
  exp, state, minutes = table.train(config, 'latent_ddpm')
  fd = table.scores(exp, state, (config.sampling.teacher_steps, 4, 2))
  teacher_fd = fd[config.sampling.teacher_steps]
  table.row(f'latent DDPM teacher (DDIM, s = {config.sampling.guidance_scale})',
            f'{teacher_fd:.3f} ({exp.sampler.nfe(config, config.sampling.teacher_steps)} NFE)',
            f'{fd[4]:.3f} (4-step DDIM)', f'{fd[2]:.3f} (2-step DDIM)', '1.00', f'{minutes:.1f}')
  for name, teacher in (('lcd', 'latent_ddpm'), ('lcm_lora', 'latent_ddpm'), ('lcf', 'lcd')):
    config = digits_config(name)
    config.latent.autoencoder = autoencoder
    config.teacher.workdir = str(table.root / teacher)
    exp, state, minutes = table.train(config, name)
    teacher_params = train.load_teacher(config, exp).params
    fd = table.scores(exp, state, (1, 2, 4), teacher_params)
    table.row(f'{name} (s = {_scale(config)})', f'{fd[1]:.3f}', f'{fd[4]:.3f}', f'{fd[2]:.3f}',
              f'{fd[4] / teacher_fd:.2f}', f'{minutes:.1f}')
  return ('Digits proxy Frechet distance of decoded samples (lower is better); ratio = 4-step FD / the teacher\'s '
          'DDIM FD', '| model | 1-step FD (teacher: DDIM 50) | 4-step FD | 2-step FD | 4-step / teacher | train minutes |')


def _scale(config):
  lo, hi = config.objective.guidance_scale
  return f'{config.sampling.guidance_scale} from U[{lo}, {hi}]' if lo < hi else f'{lo} fixed'


def lct_family(table: Table, variants):
  """The ablation of improved latent CT on the autoencoder's latent cache (per-element statistics)."""
  autoencoder = _autoencoder(table, 4)
  cache = table.root / 'latents'
  for variant in variants:
    config = digits_config('lct', variant)
    config.latent.update(autoencoder=autoencoder, cache=str(cache))
    if not (cache / 'cache.json').exists():
      latents.write_cache(config, cache)
    exp, state, minutes = table.train(config, f'lct_{variant}')
    fd = table.scores(exp, state, (1, 2))
    table.row(variant, f'{fd[1]:.3f}', f'{fd[2]:.3f}', f'{minutes:.1f}')
  return ('Improved latent CT on digits latents, cumulative ablation (configs/digits_lct.py variants); digits proxy '
          'Frechet distance of decoded samples', '| variant | 1-step FD | 2-step FD | train minutes |')


def main(argv):
  del argv
  table = Table(pathlib.Path(_WORKDIR.value))
  if _FAMILY.value == 'pixel':
    title, header = pixel_family(table, _OBJECTIVES.value)
  elif _FAMILY.value == 'latent':
    title, header = latent_family(table)
  else:
    from configs import digits_lct  # pylint: disable=g-import-not-at-top
    title, header = lct_family(table, _VARIANTS.value or digits_lct.ABLATION)
  if jax.process_index() == 0:
    columns = header.count('|') - 1
    print(f'\n{title}\n{header}\n|' + '---|' * columns + '\n' + '\n'.join(table.lines), flush=True)


if __name__ == '__main__':
  app.run(main)
