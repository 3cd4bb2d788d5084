"""The pre-flight table: per-chip HBM, estimated step time, images/s and MFU of configs on topologies, in markdown.

  python benchmarks/preflight_table.py --configs=cifar10_ict,imagenet64_sct --topologies=v5p:2x2x1,v5p:4x4x4 \
      [--set=mesh.shape.fsdp=4 ...] [--cache_dir=DIR]

Each (config, topology) pair is one pre-flight (cm_jax/preflight.py; TPU topologies need libtpu: pip install -e
'.[tpu]'). A config is a file name in configs/ without '.py', with an optional ':arg' (toy2d_ict:rings); each --set
assigns a config key (a Python literal, else a string) in every config, e.g. --set=mesh.shape.data=1
--set=mesh.shape.fsdp=-1 for FSDP over all chips. A paper network's train step takes minutes to a quarter of an hour
to compile on a 2-core host (the sampler a few minutes more: --sampler): with --cache_dir a rerun reads the
pre-flight's records. A text-to-image config (configs/sd15_sample, sdxl_lcm_lora, ...) compiles its SD UNet from the
public architecture of --sd_architecture (cm_jax/models/sd_configs.py) unless it names a latent.pipeline folder,
e.g. --configs=sd15_sample --set=train.batch_size=48 --set=model.remat=True --topologies=v5p:2x2x1. Prints one row
per pair; the
collective columns count instructions in the compiled step (each once).
"""

import ast
import importlib

from absl import app
from absl import flags

from cm_jax import preflight
from cm_jax import program_analysis

_CONFIGS = flags.DEFINE_list('configs', ['digits_ict'], 'Config names (configs/<name>.py), each with an optional :arg.')
_TOPOLOGIES = flags.DEFINE_list('topologies', ['v5p:2x2x1'], 'Topologies, as --topology of the pre-flight.')
_SET = flags.DEFINE_multi_string('set', [], 'key=value assigned in every config (e.g. mesh.shape.fsdp=4).')
_CACHE_DIR = flags.DEFINE_string('cache_dir', None, 'Persistent compilation cache and pre-flight records.')
_SAMPLER = flags.DEFINE_bool('sampler', False, 'Also compile each sampler (its bytes count towards HBM/chip).')
_SD = flags.DEFINE_string('sd_architecture', '', 'Text-to-image configs without latent.pipeline: the public Stable '
                          'Diffusion architecture (sd15, sd21_base, sdxl; empty: guessed, as the pre-flight).')
COLUMNS = ('config', 'topology', 'chips (hosts)', 'mesh', 'batch', 'HBM GiB/chip', 'fits', 'TFLOP/chip/step',
           'step ms (est.)', 'images/s', 'MFU', 'FLOP/byte', 'all-gather', 'reduce-scatter', 'all-reduce')


def load_config(name: str):
  """configs/<name>.py's get_config(), with the argument after ':' if any, and the --set assignments."""
  module, _, arg = name.partition(':')
  config = importlib.import_module(f'configs.{module}').get_config(*([arg] if arg else []))
  for assignment in _SET.value:
    path, value = assignment.split('=', 1)
    *parents, leaf = path.split('.')
    node = config
    for key in parents:
      node = node[key]
    try:
      node[leaf] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      node[leaf] = value
  return config


def row(name: str, report: preflight.Report) -> str:
  """One markdown row of the table."""
  exp, step = report.exp, report.step
  cells = [name, report.topo.name, f'{len(report.topo.devices)} ({report.topo.num_hosts})',
           ' '.join(f'{k}={v}' for k, v in exp.mesh.shape.items()), str(exp.config.train.batch_size),
           f'{report.hbm_bytes / preflight.GIB:.2f}', 'yes' if report.fits else 'no']
  if step is None:
    cells += ['-'] * (len(COLUMNS) - len(cells))
  else:
    seconds = report.step_seconds()
    cells += [f'{step.flops / 1e12:.3g}', f'{seconds * 1e3:.3g}' + ('' if step.estimated else ' (roofline)'), f'{exp.config.train.batch_size / seconds:.0f}',
              f'{report.mfu():.2f}', f'{step.flops / step.bytes_accessed:.0f}'] + [str(step.collectives[k][0]) for k in program_analysis.COLLECTIVES[:3]]
  return '| ' + ' | '.join(cells) + ' |'


def main(argv):
  del argv
  preflight.start_jax(max(preflight.cpu_count(t) for t in _TOPOLOGIES.value), _CACHE_DIR.value)
  print('| ' + ' | '.join(COLUMNS) + ' |\n|' + '---|' * len(COLUMNS), flush=True)
  for name in _CONFIGS.value:
    for topology in _TOPOLOGIES.value:
      report = preflight.run(load_config(name), topology, _CACHE_DIR.value, sampler=_SAMPLER.value,
                             sd_architecture=_SD.value)
      print(row(name, report), flush=True)


if __name__ == '__main__':
  app.run(main)
