"""The latent path end to end on digits, with tiny networks and two steps per run: an autoencoder that exports itself,
a latent DDPM teacher encoding on the fly, LCD from it, LCF from LCD, LCM-LoRA on the frozen teacher, and the latent
cache of --mode=encode with the data set's statistics."""

import pathlib

import jax
import numpy as np
import pytest

from cm_jax import checkpoint
from cm_jax import experiment
from cm_jax import latents
from cm_jax import modes
from cm_jax import train
from cm_jax.data import load_digits
from configs import digits_autoencoder
from configs import digits_latent_ddpm
from configs import digits_lcd
from configs import digits_lcf
from configs import digits_lcm_lora
from helpers import run_main

DEVICES = lambda: jax.devices()[:1]


def _tiny(config, workdir_of_autoencoder=None):
  config.train.update(batch_size=16, num_steps=2, log_every=1)
  config.checkpoint.every_steps = 2
  config.sampling.update(num_grid=4, teacher_steps=3)
  config.eval.update(proxy=False, num_samples=8)
  if config.model.name == 'mlp':
    config.model.update(hidden=16, depth=1)
  if workdir_of_autoencoder is not None:
    config.latent.autoencoder = str(workdir_of_autoencoder)
  return config


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """The tiny autoencoder run and the latent DDPM teacher on it."""
  root = tmp_path_factory.mktemp('latent')
  autoencoder = _tiny(digits_autoencoder.get_config())
  autoencoder.model.update(block_out_channels=(4, 8), norm_num_groups=2)
  autoencoder.objective.scale_records = 64
  train.train_and_evaluate(autoencoder, root / 'autoencoder', DEVICES())
  teacher = _tiny(digits_latent_ddpm.get_config(), root / 'autoencoder')
  train.train_and_evaluate(teacher, root / 'teacher', DEVICES())
  return root


def _restored_params(workdir, config):
  exp = experiment.Experiment(config, DEVICES())
  ckpt = checkpoint.Checkpointer(workdir)
  state, _ = ckpt.restore(exp.abstract_state)
  ckpt.close()
  return jax.tree.map(np.asarray, state.params)


def test_an_autoencoder_run_is_a_latent_space(runs):
  """The export loads like any diffusers folder, and its scaling factor makes the latents of the records it was
  measured on unit-variance."""
  autoencoder = latents.load_autoencoder(runs / 'autoencoder')
  assert autoencoder.path.endswith('autoencoder/autoencoder')
  images, _ = load_digits('train')
  np.testing.assert_allclose(np.std(np.asarray(autoencoder.encode(images[:64]))), 1.0, rtol=1e-3)
  assert list(pathlib.Path(runs / 'teacher' / 'samples').glob('*.png'))


def test_lcd_lcf_and_lcm_lora_train_from_the_latent_teacher(runs):
  teacher_config = _tiny(digits_latent_ddpm.get_config(), runs / 'autoencoder')
  before = _restored_params(runs / 'teacher', teacher_config)

  lcd = _tiny(digits_lcd.get_config(), runs / 'autoencoder')
  lcd.teacher.workdir = str(runs / 'teacher')
  state = train.train_and_evaluate(lcd, runs / 'lcd', DEVICES())
  assert int(state.step) == 2 and state.target is not None  # LCD keeps its EMA target
  sample = np.load(_sample_file(runs / 'lcd', lcd))['samples']
  assert sample.shape == (8, 8, 8, 1) and np.all(np.abs(sample) <= 1.0)  # decoded to the data's space

  lcf = _tiny(digits_lcf.get_config(), runs / 'autoencoder')
  lcf.teacher.workdir = str(runs / 'lcd')
  assert int(train.train_and_evaluate(lcf, runs / 'lcf', DEVICES()).step) == 2

  lora = _tiny(digits_lcm_lora.get_config(), runs / 'autoencoder')
  lora.teacher.workdir = str(runs / 'teacher')
  lora.lora.rank = 2
  state = train.train_and_evaluate(lora, runs / 'lora', DEVICES())
  leaves = jax.tree_util.tree_flatten_with_path(state.params)[0]
  assert leaves and all(str(path[-1].key) in ('a', 'b') for path, _ in leaves)  # only the adapters are trained
  assert any(np.any(np.asarray(leaf)) for path, leaf in leaves if path[-1].key == 'b')  # and they moved
  jax.tree.map(np.testing.assert_array_equal, before, _restored_params(runs / 'teacher', teacher_config))
  assert _sample_file(runs / 'lora', lora).exists()


def _sample_file(workdir, config):
  modes.sample(config, workdir, DEVICES())
  return pathlib.Path(workdir) / 'samples' / f'final_{config.eval.steps[-1]}_step.npz'


def test_latent_cache_runs_and_a_teacher_of_another_space_is_refused(runs):
  config = _tiny(digits_latent_ddpm.get_config(), runs / 'autoencoder')
  config.latent.update(cache=str(runs / 'cache'), normalization='per_element')
  modes.encode(config, str(runs / 'unused'))
  state = train.train_and_evaluate(config, runs / 'cached', DEVICES())
  assert int(state.step) == 2
  student = _tiny(digits_lcd.get_config(), runs / 'autoencoder')
  student.latent.update(cache=str(runs / 'cache'), normalization='per_element')
  student.teacher.workdir = str(runs / 'teacher')  # trained on latents scaled by the scaling factor
  with pytest.raises(ValueError, match="must share the student's data space"):
    experiment.load_teacher(student, experiment.Experiment(student, DEVICES()))


def test_a_latent_channel_mismatch_is_one_line_before_compiling(tmp_path):
  module = latents.module_from_config({'_class_name': 'AutoencoderKL', 'in_channels': 3, 'out_channels': 3,
                                       'block_out_channels': [4, 8], 'norm_num_groups': 2, 'latent_channels': 2}, 'x')
  params = module.init(jax.random.PRNGKey(0), np.zeros((1, 8, 8, 3), np.float32))['params']
  latents.export_diffusers(tmp_path / 'rgb', module, params, 1.0, 8)
  result = run_main('--config=configs/digits_latent_ddpm.py', f'--workdir={tmp_path / "run"}',
                    f'--config.latent.autoencoder={tmp_path / "rgb"}')
  errors = [line for line in result.stderr.splitlines() if line.startswith('cm_jax: error:')]
  assert result.returncode == 1 and len(errors) == 1, result.stderr[-2000:]
  assert 'takes images with 3 channels' in errors[0]
  assert not (tmp_path / 'run' / 'checkpoints').exists()
