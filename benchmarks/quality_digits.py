"""The small-data quality tables: models trained on the 8x8 digits, scored by the digits-proxy Frechet distance.

  python benchmarks/quality_digits.py [--workdir=runs/quality_digits] [--family=pixel] [--objectives=ict,cd,...]
      [--repeats=K] [--mid_candidates=0.2,0.4,0.821]
  python benchmarks/quality_digits.py --workdir=runs/quality_latent --family=latent
  python benchmarks/quality_digits.py --workdir=runs/quality_lct --family=lct [--variants=ict,full]

pixel: configs/digits_<name>.py for each pixel consistency objective (cd, ct, ict, ect, sct, scd; any subset, in the
  order given), after the teacher of its parameterisation (digits_edm, or digits_trigflow for sCT/sCD), with
  teacher.workdir set to that teacher run; FD at 1 and 2 steps next to the teacher's at 35 NFE. --mid_candidates:
  the procedure that picks a config's 2-step middle level (as iCT and ECT pick theirs by FID): each run's 2-step FD
  with each candidate level sigma (EDM levels; TrigFlow runs sample at t = arctan(sigma / sd)), on samples of seed
  config.seed + MID_SEED_OFFSET, not the table's seed config.seed + 3.
latent: the latent family in the space of digits_autoencoder: the DDPM teacher (DDIM at 50, 4 and 2 steps), LCD,
  LCM-LoRA (both from that teacher) and LCF (from the LCD run), each at 1, 2 and 4 LCM steps.
lct: the ablation of improved latent CT (configs/digits_lct.py variants) on the autoencoder's latent cache, at 1 and
  2 steps.
--repeats=K trains and scores the whole table K times with config.seed = 0..K-1 (seed 0 in DIR/<run>, seed s > 0 in
DIR/<run>_seed<s>; each student learns from the teacher of its own seed) and prints each number cell as
"mean +- sd [per-seed values]" (sd: the sample standard deviation over the seeds), so a difference between two rows
can be told from seed noise. Every run resumes from its workdir, so a rerun only evaluates; decoded samples are scored
(the autoencoder's own reconstruction FD is printed when it finishes). Prints each run's wall time.
"""

import importlib
import pathlib
import time

from absl import app
from absl import flags
import jax
import numpy as np

from cm_jax import experiment
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
_REPEATS = flags.DEFINE_integer('repeats', 1, 'Train and score the table with config.seed = 0..K-1; cells show '
                                'mean +- sd over the seeds.', lower_bound=1)
_MID_CANDIDATES = flags.DEFINE_list('mid_candidates', [], 'pixel: 2-step middle levels (sigma) to score each '
                                    'consistency run with, on samples of a seed the table does not use.')

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / 'configs'
PROXY = 'proxy_classifier.msgpack'
MID_SEED_OFFSET = 1000  # the middle-level search's samples: seed config.seed + 1000 (the table's: config.seed + 3)


def digits_config(name, arg=None):
  """configs/digits_<name>.py's config, or None when there is none."""
  if not (CONFIGS / f'digits_{name}.py').exists():
    return None
  get_config = importlib.import_module(f'configs.digits_{name}').get_config
  return get_config() if arg is None else get_config(arg)


def cell(values, spec: str) -> str:
  """One number cell: the value, or over several seeds 'mean +- sd [v1, v2, ...]' (sd with ddof 1)."""
  if len(values) == 1:
    return format(values[0], spec)
  each = ', '.join(format(v, spec) for v in values)
  return f'{np.mean(values):{spec}} +- {np.std(values, ddof=1):{spec}} [{each}]'


class Table:
  """Trains runs under one root, for one seed at a time, and scores them with one proxy classifier
  (root/proxy_classifier.msgpack, trained on first use); collects the table's rows over the seeds.

  A row is a label and its cells: text (kept as is) or (number, format spec), which the final table averages over
  the seeds (`cell`).
  """

  def __init__(self, root: pathlib.Path):
    self.root, self.seed, self.rows, self._proxy = root, 0, {}, None

  def proxy(self):
    if self._proxy is None:
      self.root.mkdir(parents=True, exist_ok=True)
      self._proxy = report.load_or_train_proxy(self.root / PROXY)
    return self._proxy

  def dir(self, name) -> pathlib.Path:
    """The workdir of run `name` for the current seed: root/name (seed 0) or root/name_seed<s>."""
    return self.root / (name if self.seed == 0 else f'{name}_seed{self.seed}')

  def train(self, config, name):
    """Trains `config` with the current seed in dir(name) (without its own end-of-run table); returns (experiment,
    state, minutes)."""
    config.eval.proxy = False
    config.seed = self.seed
    start = time.time()
    state = train.train_and_evaluate(config, self.dir(name))
    return experiment.Experiment(config), state, (time.time() - start) / 60

  def scores(self, exp, state, steps, teacher=None, seed_offset=3):
    """{steps: FD} of the run's first EMA sampled with its sampler at each step count (samples of seed
    config.seed + seed_offset; 3: the table's)."""
    c = exp.config
    return {n: report.proxy_frechet(self.proxy(), exp, state.ema[0], c.eval.num_samples, n, c.seed + seed_offset,
                                    teacher) for n in steps}

  def mid_search(self, name, exp, state, candidates):
    """Prints the run's 2-step FD with each candidate middle level (samples of seed config.seed + MID_SEED_OFFSET)."""
    fds = {}
    for sigma in candidates:
      config = exp.config.copy_and_resolve_references()
      config.sampling.update(mid_sigmas=(sigma,), mid_indices=())
      fds[sigma] = self.scores(experiment.Experiment(config), state, (2,), seed_offset=MID_SEED_OFFSET)[2]
    listed = ', '.join(f'{sigma:g}: {fd:.3f}' for sigma, fd in fds.items())
    print(f'{name} seed {self.seed}: 2-step FD by middle level sigma (seed +{MID_SEED_OFFSET}) {listed}; best '
          f'{min(fds, key=fds.get):g}', flush=True)

  def row(self, label, *cells):
    """Adds this seed's row and prints this seed's table so far."""
    self.rows.setdefault(label, {})[self.seed] = cells
    print('\n'.join(self.lines(self.seed)), flush=True)

  def lines(self, seed=None):
    """The table's lines: one seed's (seed), or every cell over the seeds (None)."""
    out = []
    for label, by_seed in self.rows.items():
      runs = list(by_seed.values()) if seed is None else [by_seed[seed]] if seed in by_seed else []
      if runs:
        cells = [c if isinstance(c, str) else cell([run[i][0] for run in runs], c[1]) for i, c in enumerate(runs[0])]
        out.append('| ' + ' | '.join([label] + cells) + ' |')
    return out


def pixel_family(table: Table, names, mid_candidates=()):
  """The consistency objectives on pixels, each after its teacher."""
  for name in names:
    if name not in PIXEL:
      raise ValueError(f'--objectives: {name!r} is not one of the pixel consistency objectives {PIXEL}.')
  teachers = {}  # parameterisation -> (workdir, 35-NFE FD)

  def teacher_of(parameterization):
    if parameterization not in teachers:
      exp, state, minutes = table.train(digits_config(parameterization), parameterization)
      fd = next(iter(table.scores(exp, state, exp.sampler.eval_steps(exp.config)).values()))
      teachers[parameterization] = (table.dir(parameterization), fd)
      table.row(f'{parameterization} teacher (35 NFE)', (fd, '.3f'), '-', '-', '-', (minutes, '.1f'))
    return teachers[parameterization]

  teacher_of('edm')
  for name in names:
    config = digits_config(name)
    teacher_dir, teacher_fd = teacher_of(config.parameterization.name)
    config.teacher.workdir = str(teacher_dir)
    exp, state, minutes = table.train(config, name)
    fd = table.scores(exp, state, (1, 2))
    table.row(name, (fd[1], '.3f'), (fd[2], '.3f'), (fd[1] / teacher_fd, '.2f'), (fd[2] / teacher_fd, '.2f'),
              (minutes, '.1f'))
    if mid_candidates:
      table.mid_search(name, exp, state, mid_candidates)
  return ('Digits proxy Frechet distance (lower is better); ratios: FD / its teacher\'s FD at 35 NFE',
          '| model | 1-step FD | 2-step FD | 1-step / teacher | 2-step / teacher | train minutes |')


def _autoencoder(table: Table, columns: int):
  """Trains digits_autoencoder; its row is the FD of reconstructed held-out digits, a floor for every latent model."""
  _, _, minutes = table.train(digits_config('autoencoder'), 'autoencoder')
  autoencoder = latents.load_autoencoder(table.dir('autoencoder'))
  images, _ = load_digits('test')
  fd = table.proxy().frechet(np.clip(np.asarray(autoencoder.decode(autoencoder.encode(images))), -1.0, 1.0))
  table.row('autoencoder reconstructions (test split)', (fd, '.3f'), *(['-'] * (columns - 3)), (minutes, '.1f'))
  return str(table.dir('autoencoder'))


def latent_family(table: Table):
  """The guided latent DDPM teacher, LCD, LCM-LoRA and LCF in the digits autoencoder's latent space."""
  autoencoder = _autoencoder(table, 6)
  config = digits_config('latent_ddpm')
  config.latent.autoencoder = autoencoder
  exp, state, minutes = table.train(config, 'latent_ddpm')
  fd = table.scores(exp, state, (config.sampling.teacher_steps, 4, 2))
  teacher_fd = fd[config.sampling.teacher_steps]
  table.row(f'latent DDPM teacher (DDIM, s = {config.sampling.guidance_scale}; '
            f'{exp.sampler.nfe(config, config.sampling.teacher_steps)} NFE / 4-step DDIM / 2-step DDIM)',
            (teacher_fd, '.3f'), (fd[4], '.3f'), (fd[2], '.3f'), '1.00', (minutes, '.1f'))
  for name, teacher in (('lcd', 'latent_ddpm'), ('lcm_lora', 'latent_ddpm'), ('lcf', 'lcd')):
    config = digits_config(name)
    config.latent.autoencoder = autoencoder
    config.teacher.workdir = str(table.dir(teacher))
    exp, state, minutes = table.train(config, name)
    teacher_params = experiment.load_teacher(config, exp).params
    fd = table.scores(exp, state, (1, 2, 4), teacher_params)
    table.row(f'{name} (s = {_scale(config)})', (fd[1], '.3f'), (fd[4], '.3f'), (fd[2], '.3f'),
              (fd[4] / teacher_fd, '.2f'), (minutes, '.1f'))
  return ('Digits proxy Frechet distance of decoded samples (lower is better); ratio = 4-step FD / the teacher\'s '
          'DDIM FD',
          '| model | 1-step FD (teacher: DDIM 50) | 4-step FD | 2-step FD | 4-step / teacher | train minutes |')


def _scale(config):
  lo, hi = config.objective.guidance_scale
  return f'{config.sampling.guidance_scale} from U[{lo}, {hi}]' if lo < hi else f'{lo} fixed'


def lct_family(table: Table, variants):
  """The ablation of improved latent CT on the autoencoder's latent cache (per-element statistics)."""
  autoencoder = _autoencoder(table, 4)
  cache = table.dir('latents')
  for variant in variants:
    config = digits_config('lct', variant)
    config.latent.update(autoencoder=autoencoder, cache=str(cache))
    if not (cache / 'cache.json').exists():
      latents.write_cache(config, cache)
    exp, state, minutes = table.train(config, f'lct_{variant}')
    fd = table.scores(exp, state, (1, 2))
    table.row(variant, (fd[1], '.3f'), (fd[2], '.3f'), (minutes, '.1f'))
  return ('Improved latent CT on digits latents, cumulative ablation (configs/digits_lct.py variants); digits proxy '
          'Frechet distance of decoded samples', '| variant | 1-step FD | 2-step FD | train minutes |')


def main(argv):
  del argv
  table = Table(pathlib.Path(_WORKDIR.value))
  for seed in range(_REPEATS.value):
    table.seed = seed
    if _FAMILY.value == 'pixel':
      title, header = pixel_family(table, _OBJECTIVES.value, [float(s) for s in _MID_CANDIDATES.value])
    elif _FAMILY.value == 'latent':
      title, header = latent_family(table)
    else:
      from configs import digits_lct  # pylint: disable=g-import-not-at-top
      title, header = lct_family(table, _VARIANTS.value or digits_lct.ABLATION)
  if jax.process_index() == 0:
    columns = header.count('|') - 1
    seeds = f'; mean +- sd [each] over config.seed = 0..{_REPEATS.value - 1}' if _REPEATS.value > 1 else ''
    print(f'\n{title}{seeds}\n{header}\n|' + '---|' * columns + '\n' + '\n'.join(table.lines()), flush=True)


if __name__ == '__main__':
  app.run(main)
