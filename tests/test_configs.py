"""Every config in configs/ builds and passes the checks a run makes before compiling anything."""

import importlib
import pathlib

import pytest

from cm_jax import experiment
from cm_jax import objectives
from cm_jax.models import build_model

CONFIGS = sorted(p.stem for p in (pathlib.Path(__file__).parents[1] / 'configs').glob('*.py')
                 if p.stem not in ('__init__', 'base'))


def test_the_list_holds_the_configs_of_each_family():
  assert len(CONFIGS) >= 40
  assert {'digits_ict', 'cifar10_ict', 'imagenet64_sct', 'imagenet64_trigflow', 'cifar10_lcd'} <= set(CONFIGS)


@pytest.mark.parametrize('name', CONFIGS)
def test_config_passes_the_checks_of_a_run(name):
  config = importlib.import_module(f'configs.{name}').get_config()
  experiment.check_config(config)  # raises ValueError naming a bad key
  # A pipeline config's UNet is the user's pipeline's: here diffusers' default UNet2DConditionModel (SD 1.5's shape).
  unet = {'cross_attention_dim': 768} if config.model.name == 'sd_unet' else None
  objectives.make_objective(config, build_model(config.model, unet))  # exact objective keys, the guidance input


@pytest.mark.parametrize('name', CONFIGS)
def test_every_key_the_objective_reads_is_in_the_config(name):
  """So that --config.objective.KEY=VALUE can set any of them (an override of an absent key is refused)."""
  config = importlib.import_module(f'configs.{name}').get_config()
  required, optional = objectives.objective_keys(config.objective.name)
  assert required | set(optional) == set(config.objective.keys())


def test_the_command_line_sets_an_optional_objective_key(tmp_path):
  """digits_ict with --config.objective.coupling=exact (issue 24): parsed, and the key reaches the objective."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  root = pathlib.Path(__file__).parents[1]
  script = ('import sys; from absl import flags; from ml_collections import config_flags; from cm_jax import cli; '
            "c = config_flags.DEFINE_config_file('config'); cli.parse_flags(sys.argv); "
            'print(c.value.objective.coupling, c.value.objective.sinkhorn_epsilon)')
  out = subprocess.run([sys.executable, '-c', script, f'--config={root}/configs/digits_ict.py',
                        '--config.objective.coupling=exact', '--config.objective.sinkhorn_epsilon=0.2'],
                       capture_output=True, text=True, cwd=root, check=False)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.split() == ['exact', '0.2']
