"""The latent family's configs: each builds its network on its latent shape, its objective and its train state
(shapes only, no data or weights needed), carries its command, hardware and published result, and switches on what
it says."""

import importlib
import math

import flax
import jax
import jax.numpy as jnp
import pytest

from cm_jax import objectives
from cm_jax.models import build_model

# config -> the shape its network sees: CIFAR-10 through cifar10_autoencoder (f = 4, 4 channels), 256x256 images
# through Stable Diffusion's VAE (f = 8, 4 channels), digits through digits_autoencoder (f = 2, 2 channels).
CONFIGS = {'cifar10_autoencoder': (32, 32, 3), 'cifar10_latent_ddpm': (8, 8, 4), 'cifar10_lcd': (8, 8, 4),
           'cifar10_lcm_lora': (8, 8, 4), 'cifar10_lct': (8, 8, 4), 'celebahq256_lct': (32, 32, 4),
           'celebahq256_ilct': (32, 32, 4), 'ffhq256_lct': (32, 32, 4), 'lsun_church256_lct': (32, 32, 4),
           'digits_autoencoder': (8, 8, 1), 'digits_latent_ddpm': (4, 4, 2), 'digits_lcd': (4, 4, 2),
           'digits_lcf': (4, 4, 2), 'digits_lcm_lora': (4, 4, 2), 'digits_lct': (4, 4, 2)}
PUBLISHED = {'celebahq256_lct': '7.27 / 6.93', 'celebahq256_ilct': '37.15 / 16.84', 'ffhq256_lct': '8.72 / 8.29',
             'lsun_church256_lct': '8.87 / 7.71'}


def _abstract_params(config, shape):
  model = build_model(config.model)
  objective = objectives.make_objective(config, model)
  cond = jnp.zeros((1,), jnp.int32) if config.model.get('num_classes', 0) else None
  sample_input = (jnp.zeros((1,) + shape), jnp.zeros((1,)), cond)
  return objective, jax.eval_shape(lambda: objective.init_params(model, jax.random.key(0), sample_input))


@pytest.mark.parametrize('name', sorted(CONFIGS))
def test_latent_config_builds_its_objective_and_parameters(name):
  config = importlib.import_module(f'configs.{name}').get_config()
  objective, params = _abstract_params(config, CONFIGS[name])
  paths = flax.traverse_util.flatten_dict(params, sep='/')
  if config.get('lora', {}).get('rank', 0):
    assert all(p.endswith(('/a', '/b')) for p in paths)  # only adapters are trained
  if config.model.get('norm') == 'nsln':
    assert not [p for p in paths if p.endswith('/scale')]
  doc = importlib.import_module(f'configs.{name}').__doc__
  assert 'Command' in doc and 'Hardware' in doc and ('FID' in doc or 'Expected' in doc), name
  if name in PUBLISHED:
    assert PUBLISHED[name] in doc and 'Batch 128' in doc
  if name.endswith('lct') and name != 'digits_lct':
    assert config.objective.s1 == 640 and config.optim.name == 'radam' and config.optim.weight_decay == 1e-4
    assert config.latent.normalization == 'per_element'
    assert config.train.batch_size == (512 if name.startswith('cifar10') else 128)


def test_lcm_lora_adapts_every_kernel_with_rank_r():
  config = importlib.import_module('configs.cifar10_lcm_lora').get_config()
  model = build_model(config.model)
  base = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 4)), jnp.zeros((1,)),
                                           jnp.zeros((1,), jnp.int32))['params'])
  _, adapters = _abstract_params(config, (8, 8, 4))
  kernels = [v.shape for p, v in flax.traverse_util.flatten_dict(base, sep='/').items() if p.endswith('/kernel')]
  expected = sum(64 * (math.prod(shape[:-1]) + shape[-1]) for shape in kernels)  # r (d_in + d_out) per kernel
  assert sum(math.prod(x.shape) for x in jax.tree.leaves(adapters)) == expected and len(kernels) > 50


def test_the_digits_lct_ablation_adds_one_change_at_a_time():
  from configs import digits_lct  # pylint: disable=g-import-not-at-top
  settings = lambda c: (c.objective.distance, c.objective.diffusion_loss_weight > 0, c.objective.coupling,
                        c.objective.c_schedule, c.model.norm)
  rows = [settings(digits_lct.get_config(v)) for v in digits_lct.ABLATION]
  assert rows[0] == ('pseudo_huber', False, 'none', 'fixed', 'layer')
  assert rows[-1] == ('cauchy', True, 'exact', 'adaptive', 'nsln')
  assert all(sum(a != b for a, b in zip(r, s)) == 1 for r, s in zip(rows, rows[1:]))
  with pytest.raises(ValueError, match='digits_lct variant'):
    digits_lct.get_config('ot_only')
