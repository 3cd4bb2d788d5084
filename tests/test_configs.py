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
