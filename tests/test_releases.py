"""Released networks as a run's teacher, starting point and model (cm_jax/releases.py): the committed tiny EDM pickle
(tests/data/tiny_edm_ncsnpp.pkl: NCSN++ under EDMPrecond, 8x8x3, 3 classes) as CD's teacher and ECT's start, sampled
by --mode=sample with no training; a tiny CM-paper .pt written with torch; bad files end in one line."""

import os
import pickle

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image

from cm_jax import experiment
from cm_jax import modes
from cm_jax import releases
from cm_jax.models import checkpoints
from configs import base
from helpers import run_main
from test_cli import _assert_one_clear_error

FIXTURE = os.path.join(os.path.dirname(__file__), 'data', 'tiny_edm_ncsnpp.pkl')
ONE = jax.devices()[:1]  # one device: the runs here compile in seconds, not a minute
CD = dict(name='cd', num_scales=4, solver='heun', target_ema=0.0, distance='l2')
ECT = dict(name='ect', p_mean=-1.1, p_std=2.0, q=2.0, stage_steps=4, distance='l2_norm', weighting='inverse_delta')


@pytest.fixture(scope='module')
def fixture_net():
  return checkpoints.load_edm(FIXTURE)


@pytest.fixture(scope='module')
def images(tmp_path_factory):
  """An image folder of the fixture's data: 3 classes of 8x8 RGB images."""
  root = tmp_path_factory.mktemp('images')
  rng = np.random.default_rng(0)
  for label in range(3):
    (root / 'train' / f'class{label}').mkdir(parents=True)
    for i in range(4):
      image = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
      Image.fromarray(image).save(root / 'train' / f'class{label}' / f'{i}.png')
  return root


def _config(images, net, objective, **sections):
  """A tiny run on `images` whose network is the released `net`'s; sections: {'teacher': {...}, 'init': {...}}."""
  c = base.get_config()
  c.data.update(name='image_folder', path=str(images))
  c.model = ml_collections.ConfigDict(dict(net.model_config, dropout=0.0))
  c.objective = ml_collections.ConfigDict(objective)
  c.train.update(batch_size=8, num_steps=2, log_every=1)
  c.sampling.update(teacher_steps=2, num_grid=8, mid_sigmas=(0.821,))
  c.eval.update(num_samples=8, steps=(1,))
  c.teacher = ml_collections.ConfigDict({'workdir': '', 'checkpoint': '', 'init': False, **sections.get('teacher', {})})
  c.init = ml_collections.ConfigDict({'checkpoint': '', **sections.get('init', {})})
  return c


def _flat(tree):
  return {k: np.asarray(v) for k, v in flax.traverse_util.flatten_dict(tree, sep='/').items()}


def test_a_released_edm_pickle_is_cds_teacher(images, fixture_net):
  """The teacher inside the run is the file's D(x; sigma); the train steps run on it."""
  config = _config(images, fixture_net, CD, teacher=dict(checkpoint=FIXTURE))
  exp = experiment.Experiment(config, ONE)
  teacher = experiment.load_teacher(config, exp, required=True)
  rng = np.random.default_rng(1)
  x = rng.standard_normal((4, 8, 8, 3)).astype(np.float32)
  sigma, labels = np.array([0.01, 0.4, 3.0, 60.0], np.float32), np.array([0, 2, 1, 2])
  net = lambda x_in, c_noise: exp.model.apply({'params': teacher.params}, x_in, c_noise, jnp.asarray(labels))
  in_run = exp.process.denoise(net, jnp.asarray(x), jnp.asarray(sigma))
  np.testing.assert_allclose(in_run, fixture_net.denoise(x, sigma, labels), rtol=1e-5, atol=1e-6)
  state, step_fn = exp.init_state(), exp.train_step()
  with exp.batches(0) as batches:
    for _ in range(2):
      state, metrics = step_fn(state, next(batches), exp.frozen(teacher.params))
      assert np.isfinite(float(metrics['loss']))


def test_a_released_edm_pickle_is_ects_start(images, fixture_net):
  """teacher.init: the step-0 network, EMA and target are the file's parameters."""
  config = _config(images, fixture_net, ECT, teacher=dict(checkpoint=FIXTURE, init=True))
  exp = experiment.Experiment(config, ONE)
  teacher = experiment.load_teacher(config, exp)
  state = exp.init_state(teacher.params)
  want = _flat(fixture_net.params)
  for tree in (state.params, state.ema[0]):
    got = _flat(tree)
    assert sorted(got) == sorted(want)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_a_released_edm_pickle_is_the_edm_teacher_of_a_trigflow_student(images, fixture_net):
  """sCD reading its teacher as 'edm' (objective.teacher): the TrigFlow student takes the file, whose Experiment
  denoises with EDM's scalings."""
  from configs import digits_scd  # pylint: disable=g-import-not-at-top
  scd = digits_scd.get_config()
  config = _config(images, fixture_net, dict(scd.objective, teacher='edm'), teacher=dict(checkpoint=FIXTURE))
  config.parameterization = scd.parameterization
  exp = experiment.Experiment(config, ONE)
  teacher = experiment.load_teacher(config, exp, required=True)
  assert exp.config.parameterization.name == 'trigflow'
  assert teacher.experiment.config.parameterization.name == 'edm'
  assert teacher.experiment.config.parameterization.sigma_data == 0.5
  config.objective.teacher = 'trigflow'  # a TrigFlow teacher: no released file is one
  with pytest.raises(ValueError, match="reads its diffusion teacher as 'trigflow'"):
    experiment.load_teacher(config, experiment.Experiment(config, ONE), required=True)


def test_the_augmentation_input_is_dropped_for_a_run_without_one(images, fixture_net):
  """ECT reads EDM's augmentation-trained pickle into a network without map_augment: with no augmentation labels
  the layer (bias-free) adds nothing, so the denoiser is the file's."""
  config = _config(images, fixture_net, CD, teacher=dict(checkpoint=FIXTURE))
  config.model.augment_dim = 0
  exp = experiment.Experiment(config, ONE)
  teacher = experiment.load_teacher(config, exp, required=True)
  assert 'map_augment/kernel' not in _flat(teacher.params)
  x = np.random.default_rng(2).standard_normal((2, 8, 8, 3)).astype(np.float32)
  sigma, labels = np.array([0.3, 5.0], np.float32), np.array([1, 0])
  net = lambda x_in, c_noise: exp.model.apply({'params': teacher.params}, x_in, c_noise, jnp.asarray(labels))
  np.testing.assert_allclose(exp.process.denoise(net, jnp.asarray(x), jnp.asarray(sigma)),
                             fixture_net.denoise(x, sigma, labels), rtol=1e-5, atol=1e-6)


def test_sample_mode_reads_the_released_file_with_no_training(images, fixture_net, tmp_path):
  config = _config(images, fixture_net, dict(name='edm', p_mean=-1.2, p_std=1.2), init=dict(checkpoint=FIXTURE))
  releases.check_workdir(config, tmp_path / 'run', 'sample')
  exp, state = experiment.restore_latest(config, tmp_path / 'run', ONE)
  assert int(state.step) == 0
  for k, v in _flat(fixture_net.params).items():
    np.testing.assert_array_equal(_flat(state.ema[0])[k], v, err_msg=k)
  modes.sample(config, str(tmp_path / 'run'), ONE)
  samples = np.load(tmp_path / 'run' / 'samples' / 'final_2_step.npz')['samples']
  assert samples.shape == (8, 8, 8, 3) and np.isfinite(samples).all()
  assert not (tmp_path / 'run' / 'checkpoints').exists()


def _class_folder(root, num_classes: int, resolution: int):
  rng = np.random.default_rng(0)
  for label in range(num_classes):
    (root / 'train' / f'c{label}').mkdir(parents=True)
    for i in range(2):
      Image.fromarray(rng.integers(0, 256, (resolution, resolution, 3), dtype=np.uint8)).save(
          root / 'train' / f'c{label}' / f'{i}.png')
  return root


def test_a_cm_release_is_the_consistency_model_of_the_reading_modes(tmp_path):
  """A CM-paper consistency checkpoint (.pt) as init.checkpoint: the run's f(x, sigma) is the file's."""
  torch = pytest.importorskip('torch')
  import test_checkpoints as tc  # pylint: disable=g-import-not-at-top
  path = tmp_path / 'cd_tiny.pt'
  torch.save(tc._gd_network('imagenet_like').state_dict(), path)
  model_config = tc.CM_CASES['imagenet_like'][1]
  released = checkpoints.load_cm(path, model_config, resolution=tc.RES)
  config = _config(_class_folder(tmp_path / 'five', 5, tc.RES), released, CD, init=dict(checkpoint=str(path)))
  exp, state = experiment.restore_latest(config, tmp_path / 'run', ONE)
  rng = np.random.default_rng(4)
  x = rng.standard_normal((4, tc.RES, tc.RES, 3)).astype(np.float32)
  sigma, labels = np.array([0.002, 0.5, 7.0, 80.0], np.float32), np.array([0, 4, 2, 1])
  net = lambda x_in, c_noise: exp.model.apply({'params': state.ema[0]}, x_in, c_noise, jnp.asarray(labels))
  np.testing.assert_allclose(exp.process.consistency(net, jnp.asarray(x), jnp.asarray(sigma)),
                             released.consistency(x, sigma, labels), rtol=1e-5, atol=1e-5)


def test_the_paper_configs_name_the_released_networks():
  """cifar10_ect's network is the one EDM's VP pickle's constructor arguments describe (EDM's train.py ddpmpp:
  SongUNet, 128 channels, [2, 2, 2], positional, [1, 1]), without the augmentation input; imagenet64_cd_lpips's is
  the CM paper's UNet preset."""
  from configs import cifar10_ect  # pylint: disable=g-import-not-at-top
  from configs import imagenet64_cd_lpips  # pylint: disable=g-import-not-at-top
  from cm_jax import models  # pylint: disable=g-import-not-at-top
  kwargs = dict(checkpoints._SONG_DEFAULTS, img_resolution=32, in_channels=3, out_channels=3, augment_dim=0,
                model_channels=128, channel_mult=[2, 2, 2], embedding_type='positional', channel_mult_noise=1,
                encoder_type='standard', decoder_type='standard', resample_filter=[1, 1])
  c = cifar10_ect.get_config()
  assert c.teacher.checkpoint.endswith('edm-cifar10-32x32-uncond-vp.pkl') and c.teacher.init
  assert (experiment.network_fields(models.build_model(c.model)) ==
          experiment.network_fields(models.build_model(checkpoints._song_config(kwargs))))
  c = imagenet64_cd_lpips.get_config()
  assert c.teacher.checkpoint.endswith('edm_imagenet64_ema.pt')
  assert (experiment.network_fields(models.build_model(c.model)) ==
          experiment.network_fields(models.build_model(checkpoints.CM_CONFIGS['imagenet64'][1])))


def test_a_missing_release_names_the_path_and_its_url(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"weights/cd_imagenet64_lpips\.pt.*openaipublic.*cd_imagenet64_lpips"):
    releases.read('init.checkpoint', 'weights/cd_imagenet64_lpips.pt')


def _bad_files(tmp_path):
  """case -> (the file, fragments of its one error line)."""
  data = open(FIXTURE, 'rb').read()
  (tmp_path / 'truncated.pkl').write_bytes(data[:len(data) // 2])
  (tmp_path / 'gan.pkl').write_bytes(pickle.dumps({'G_ema': 1}))
  return {
      'truncated': (tmp_path / 'truncated.pkl', ['truncated.pkl', 'is not a readable pickle']),
      'not an EDM network': (tmp_path / 'gan.pkl', ['not an EDM network snapshot', "['G_ema']"]),
      'another architecture': (os.path.join(os.path.dirname(__file__), 'data', 'tiny_state_dict_zip.pth'),
                               ['tiny_state_dict_zip.pth', 'lacks the tensor input_blocks.0.0.bias (shape (256,)']),
  }


def _nothing_written(workdir):
  """The workdir holds no more than the log a started run keeps."""
  return not workdir.exists() or sorted(p.name for p in workdir.iterdir()) in ([], ['logs'])


@pytest.mark.parametrize('case', ['truncated', 'not an EDM network', 'another architecture'])
def test_a_bad_release_file_is_one_line(case, images, fixture_net, tmp_path):
  path, fragments = _bad_files(tmp_path)[case]
  config = _config(images, fixture_net, dict(name='edm', p_mean=-1.2, p_std=1.2), init=dict(checkpoint=str(path)))
  with pytest.raises(ValueError) as info:
    releases.initial_state(config, experiment.Experiment(config, ONE))
  assert '\n' not in str(info.value) and all(f in str(info.value) for f in fragments), str(info.value)


def test_a_bad_release_file_through_main_is_one_line_and_nothing_is_written(images, tmp_path):
  path, fragments = _bad_files(tmp_path)['not an EDM network']
  workdir = tmp_path / 'run'
  result = run_main('--config=configs/imagenet64_cm_release.py:cd_lpips', f'--workdir={workdir}', '--mode=sample',
                    '--config.data.name=image_folder', f'--config.data.path={images}', '--config.train.batch_size=4',
                    f'--config.init.checkpoint={path}')
  _assert_one_clear_error(result, *fragments)
  assert _nothing_written(workdir)


def test_a_state_dict_of_another_shape_names_the_tensor_and_both_shapes(images, tmp_path):
  torch = pytest.importorskip('torch')
  import test_checkpoints as tc  # pylint: disable=g-import-not-at-top
  path = tmp_path / 'cd_narrow.pt'
  torch.save(tc._gd_network('imagenet_like').state_dict(), path)  # 32 channels, where the config's UNet has 192
  workdir = tmp_path / 'run'
  result = run_main('--config=configs/imagenet64_cm_release.py:cd_lpips', f'--workdir={workdir}', '--mode=sample',
                    '--config.data.name=image_folder', f'--config.data.path={images}', '--config.train.batch_size=4',
                    f'--config.init.checkpoint={path}')
  _assert_one_clear_error(result, 'cd_narrow.pt', 'tensor input_blocks.0.0.bias has shape (32,)', 'needs (192,)')
  assert _nothing_written(workdir)


def test_a_ve_teacher_for_cd_is_one_line_and_nothing_is_written(images, tmp_path):
  """A VEPrecond pickle as the teacher of CD (which reads an EDM-preconditioned denoiser): refused by name."""
  pytest.importorskip('torch')
  import test_checkpoints as tc  # pylint: disable=g-import-not-at-top
  path = tmp_path / 've.pkl'
  path.write_bytes(tc._snapshot(tc._network('ncsnpp_ve')))
  workdir = tmp_path / 'run'
  result = run_main('--config=configs/imagenet64_cd_lpips.py', f'--workdir={workdir}',
                    '--config.data.name=image_folder', f'--config.data.path={images}', '--config.train.batch_size=4',
                    '--config.objective.distance=l2', f'--config.teacher.checkpoint={path}')
  _assert_one_clear_error(result, 've.pkl', 'VEPrecond', "reads its diffusion teacher as 'edm'")
  assert _nothing_written(workdir)


def test_init_checkpoint_is_refused_by_train_and_beside_a_runs_checkpoints(images, fixture_net, tmp_path):
  config = _config(images, fixture_net, CD, init=dict(checkpoint=FIXTURE))
  with pytest.raises(ValueError, match='teacher.checkpoint'):
    releases.check_workdir(config, tmp_path / 'new', 'train')
  (tmp_path / 'run' / 'checkpoints').mkdir(parents=True)
  with pytest.raises(ValueError, match="holds a run's checkpoints"):
    releases.check_workdir(config, tmp_path / 'run', 'fid')
