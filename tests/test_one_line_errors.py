"""Bad input that used to end in a traceback or a misleading message (issue 24, item 2) now stops in one line that
names the cause (the file, the setting) and what to do: each case below fails without its fix."""

import importlib.util
import json
import os
import shutil

import ml_collections
import numpy as np
import pytest

from cm_jax import data
from cm_jax import latents
from cm_jax import workdir
from cm_jax import writers
from cm_jax.evaluation import frechet
from cm_jax.models import lora
from helpers import run_main
from helpers import tiny_cli_config
from test_cli import _assert_one_clear_error
from test_latents import _latent_config
from test_latents import _tensors
from test_latents import _write


def _one_line(raised, *fragments):
  message = str(raised.value)
  assert '\n' not in message, message
  for fragment in fragments:
    assert fragment in message, message


# ----------------------------------------------------------------------------------------------------------
# The latent cache of --mode=encode and the autoencoder it reads.
# ----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope='module')
def cache(tmp_path_factory):
  """(autoencoder folder, the config, a complete latent cache of the digits' train split)."""
  root = tmp_path_factory.mktemp('latent')
  vae = _write(root / 'vae')
  config = _latent_config(vae, root / 'cache', 'per_element')
  latents.write_cache(config, config.latent.cache)
  return vae, config, root / 'cache'


def _copy(cache_dir, tmp_path):
  return shutil.copytree(cache_dir, tmp_path / 'copy')


def test_encode_onto_a_file_or_under_one(tmp_path, cache):
  vae, _, _ = cache
  (tmp_path / 'a_file').write_text('x')
  for target, where in ((tmp_path / 'a_file', 'it is a file'), (tmp_path / 'a_file' / 'sub', f'{tmp_path}/a_file '
                                                                 'is a file')):
    with pytest.raises(ValueError) as raised:
      latents.write_cache(_latent_config(vae, target), target)
    _one_line(raised, f'cannot write the latent cache {target}: {where}', 'choose a latent.cache that is a writable')


def test_encode_onto_a_file_from_the_command_line(tmp_path, cache):
  """The user's path: one `cm_jax: error:` line, exit status 1, the file untouched."""
  vae, _, _ = cache
  (tmp_path / 'a_file').write_text('x')
  result = run_main('--config=configs/digits_latent_ddpm.py', f'--workdir={tmp_path / "run"}', '--mode=encode',
                    f'--config.latent.cache={tmp_path / "a_file"}', f'--config.latent.autoencoder={vae}')
  _assert_one_clear_error(result, f'cannot write the latent cache {tmp_path}/a_file: it is a file')
  assert result.returncode == 1 and (tmp_path / 'a_file').read_text() == 'x'


def test_encode_into_a_read_only_place(tmp_path, cache, monkeypatch):
  """(Permission bits do not stop root: os.access answers as for another user.)"""
  vae, _, _ = cache
  real = os.access
  monkeypatch.setattr(os, 'access', lambda p, mode: real(p, mode) and str(p) != str(tmp_path))
  target = tmp_path / 'new' / 'cache'
  with pytest.raises(ValueError) as raised:
    latents.write_cache(_latent_config(vae, target), target)
  _one_line(raised, f'cannot write the latent cache {target}: {tmp_path} is not writable (permission denied)')
  assert not (tmp_path / 'new').exists()


@pytest.mark.parametrize('damage', ['cut short', 'garbage'])
def test_a_corrupt_shard_is_named(tmp_path, cache, damage):
  vae, _, cache_dir = cache
  copy = _copy(cache_dir, tmp_path)
  shard = next(copy.glob('*.array_record'))
  data = shard.read_bytes()
  shard.write_bytes(data[:len(data) // 2] if damage == 'cut short' else b'garbage' * 100)
  with pytest.raises(ValueError) as raised:
    latents.build(_latent_config(vae, copy, 'per_element'))
  _one_line(raised, f'The shard {shard} of the latent cache is unreadable', f'delete {copy} and write the cache '
            'again with --mode=encode')


def test_a_cut_short_cache_json_is_named_and_written_atomically(tmp_path, cache, monkeypatch):
  vae, _, cache_dir = cache
  copy = _copy(cache_dir, tmp_path)
  index = copy / 'cache.json'
  index.write_text(index.read_text()[:50])
  with pytest.raises(ValueError) as raised:
    latents.build(_latent_config(vae, copy, 'per_element'))
  _one_line(raised, f'{index} is not the index of a latent cache (JSONDecodeError')
  # cache.json goes through a temporary file renamed over it: killed mid-write, no cut-short index is left
  written, real = [], workdir.write_atomically
  monkeypatch.setattr(workdir, 'write_atomically', lambda path, text: (written.append(str(path)), real(path, text)))
  fresh = tmp_path / 'fresh'
  latents.write_cache(_latent_config(vae, fresh, 'per_element'), fresh)
  assert written == [str(fresh / 'cache.json')]
  assert sorted(p.name for p in fresh.iterdir()) == ['cache.json', 'latents-00000-of-00001.array_record', 'stats.npz']


def test_a_complete_cache_of_the_same_autoencoder_and_data_is_found(cache):
  vae, config, cache_dir = cache
  found = latents.complete_cache(config, cache_dir)
  assert len(found) == 1437 and found.shape == (4, 4, 2)
  assert latents.complete_cache(config, cache_dir.parent / 'no_cache') is None
  other = _latent_config(vae, cache_dir, 'per_element')
  other.data.split = 'test'
  with pytest.raises(ValueError) as raised:
    latents.complete_cache(other, cache_dir)
  _one_line(raised, "encoded from other data (data.split is 'train' there, 'test' here)")


def test_an_autoencoder_with_nan_weights_is_named(tmp_path):
  tensors = _tensors()
  name = sorted(tensors)[5]
  tensors[name].flat[0] = np.nan
  folder = _write(tmp_path / 'vae', tensors)
  with pytest.raises(ValueError) as raised:
    latents.load_autoencoder(folder)
  _one_line(raised, f'The autoencoder {folder} has non-finite (NaN or inf) weights in 1 tensors')


def test_a_pipeline_root_points_to_its_vae(tmp_path):
  root = tmp_path / 'pipeline'
  _write(root / 'vae')
  (root / 'model_index.json').write_text(json.dumps({'vae': ['diffusers', 'AutoencoderKL']}))
  with pytest.raises(ValueError) as raised:
    latents.load_autoencoder(root)
  _one_line(raised, f'{root} is a diffusers pipeline', f'set latent.autoencoder={root}/vae')


def test_a_pixel_run_is_not_an_autoencoder_run(tmp_path):
  run = tmp_path / 'edm_run'
  (run / 'checkpoints').mkdir(parents=True)
  (run / 'config.json').write_text(json.dumps({'objective': {'name': 'edm'}, 'data': {}, 'model': {}, 'train': {}}))
  with pytest.raises(ValueError) as raised:
    latents.load_autoencoder(run)
  _one_line(raised, f"{run} is a cm_jax 'edm' run, not an autoencoder run")
  assert 'again' not in str(raised.value)


# ----------------------------------------------------------------------------------------------------------
# LoRA's rules.
# ----------------------------------------------------------------------------------------------------------
def test_a_lora_rule_that_is_no_regex():
  with pytest.raises(ValueError) as raised:
    lora.select({'dense': {'kernel': np.zeros((2, 2))}}, ('kernel$', 'up_blocks_(0'))
  _one_line(raised, "lora.rules entry 'up_blocks_(0' is not a regular expression (missing ), unterminated")


# ----------------------------------------------------------------------------------------------------------
# Data, trackers.
# ----------------------------------------------------------------------------------------------------------
def test_a_negative_image_size(tmp_path):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  (tmp_path / 'images').mkdir()
  Image.new('RGB', (8, 8)).save(tmp_path / 'images' / 'a.png')
  config = ml_collections.ConfigDict(dict(name='image_folder', split='train', data_dir=str(tmp_path / 'prepared'),
                                          path=str(tmp_path / 'images'), image_size=-4, num_records=0, seed=0))
  with pytest.raises(ValueError) as raised:
    data.build_source(config)
  _one_line(raised, 'data.image_size=-4 is negative')
  assert not (tmp_path / 'prepared').exists()


@pytest.mark.parametrize('environ, netrc_host, found', [
    ({}, None, False),
    ({'WANDB_API_KEY': 'k'}, None, True),
    ({'WANDB_IDENTITY_TOKEN_FILE': '/token'}, None, True),
    ({}, 'api.wandb.ai', True),  # ~/.netrc, as `wandb login` writes it
    ({}, 'example.com', False),  # a netrc without the W&B host
    ({'WANDB_BASE_URL': 'https://wandb.example.com'}, 'wandb.example.com', True),  # a W&B server
    ({'NETRC': 'elsewhere'}, 'api.wandb.ai', True),  # $NETRC names the file
])
def test_wandb_credentials(tmp_path, environ, netrc_host, found):
  """Where W&B finds its key: the variables, or the netrc file of its host."""
  home = tmp_path / 'home'
  home.mkdir()
  environ = dict(environ, HOME=str(home))
  if netrc_host:
    path = tmp_path / 'elsewhere' if 'NETRC' in environ else home / '.netrc'
    path.write_text(f'machine {netrc_host}\n  login user\n  password 0123456789abcdef\n')
    environ = dict(environ, NETRC=str(path)) if 'NETRC' in environ else environ
  assert writers.wandb_credentials_found(environ) == found


def test_wandb_online_without_a_key_says_how_to_log_in(tmp_path, monkeypatch):
  if importlib.util.find_spec('wandb') is None:
    pytest.skip('wandb is not installed: test_wandb_credentials tests the check')
  for name in ('WANDB_API_KEY', 'WANDB_IDENTITY_TOKEN_FILE', 'WANDB_BASE_URL', 'NETRC'):
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setenv('HOME', str(tmp_path))
  config = ml_collections.ConfigDict(dict(logging=dict(wandb=dict(mode='online', project='p', entity=''))))
  with pytest.raises(ValueError) as raised:
    writers.check_logging_config(config)
  _one_line(raised, "logging.wandb.mode='online' needs a W&B API key", 'wandb login', 'WANDB_API_KEY',
            '--config.logging.wandb.mode=offline')
  config.logging.wandb.mode = 'offline'
  writers.check_logging_config(config)  # offline needs no key


# ----------------------------------------------------------------------------------------------------------
# LCD's skip against the evaluation's step counts.
# ----------------------------------------------------------------------------------------------------------
def _lcd_config(skip, steps):
  return ml_collections.ConfigDict(dict(
      model=dict(num_classes=0), teacher=dict(init=False), eval=dict(steps=steps),
      parameterization=dict(name='vp', num_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                            beta_schedule='scaled_linear', prediction='epsilon', sigma_data=0.5, timestep_scaling=10.0),
      objective=dict(name='lcd', skip=skip, guidance_scale=(1.0, 1.0), target_ema=0.0, distance='l2',
                     distance_c=0.0)))


def test_an_lcd_skip_that_leaves_too_few_solver_steps_is_refused_at_start():
  from cm_jax.models import build_model  # pylint: disable=g-import-not-at-top
  from cm_jax.objectives.latent import make_lcd  # pylint: disable=g-import-not-at-top
  from cm_jax.parameterization import VP  # pylint: disable=g-import-not-at-top
  mlp = build_model(dict(name='mlp', hidden=8, depth=1, num_classes=0, time_embedding='positional', time_scale=1.0))
  make_lcd(_lcd_config(250, (1, 2, 4)), mlp, VP())  # 1000 / 250 = 4 solver steps: enough
  with pytest.raises(ValueError) as raised:
    make_lcd(_lcd_config(250, (1, 2, 8)), mlp, VP())
  _one_line(raised, 'eval.steps=(1, 2, 8) asks for 8-step sampling, but objective.skip=250 leaves 4 solver steps')


# ----------------------------------------------------------------------------------------------------------
# The modes: --mode=encode twice, --mode=eval on 2-D data.
# ----------------------------------------------------------------------------------------------------------
def test_encode_again_on_a_complete_cache_says_it_is_there(cache, capsys):
  from cm_jax import modes  # pylint: disable=g-import-not-at-top
  _, config, cache_dir = cache
  before = {p.name: p.stat().st_mtime_ns for p in cache_dir.iterdir()}
  modes.encode(config, str(cache_dir.parent / 'run'))
  assert f'The latent cache {cache_dir} is already there: 1437 records of shape (4, 4, 2)' in capsys.readouterr().out
  assert {p.name: p.stat().st_mtime_ns for p in cache_dir.iterdir()} == before  # nothing rewritten


def test_eval_on_2d_toy_data_is_one_line():
  """What --mode=eval (and eval.proxy) checks before the proxy is loaded: a flax shape traceback before."""
  import jax  # pylint: disable=g-import-not-at-top
  from cm_jax import experiment  # pylint: disable=g-import-not-at-top
  from cm_jax.evaluation import report  # pylint: disable=g-import-not-at-top
  exp = experiment.Experiment(tiny_cli_config(), jax.devices()[:1])
  with pytest.raises(ValueError) as raised:
    report.check_scorable(exp)
  _one_line(raised, "The digits proxy of --mode=eval and eval.proxy scores 8x8x1 digits; this run (data.name='gmm') "
            'makes samples of shape (2,): look at them with --mode=sample')
  from configs import digits_edm  # pylint: disable=g-import-not-at-top
  report.check_scorable(experiment.Experiment(digits_edm.get_config(), jax.devices()[:1]))  # digits: scored


# ----------------------------------------------------------------------------------------------------------
# The Frechet distance of non-finite statistics (FID's reference: test_fid_bad_input).
# ----------------------------------------------------------------------------------------------------------
def test_a_non_finite_sigma_gives_nan_not_a_scipy_error():
  sigma = np.diag([1.0, 2.0, 3.0])
  assert frechet.frechet_distance(np.zeros(3), sigma, np.ones(3), sigma) == pytest.approx(3.0)
  for bad in (np.full((3, 3), np.nan), np.where(np.eye(3) > 0, np.inf, 0.0)):  # scipy's sqrtm: "Internal error"
    assert np.isnan(frechet.frechet_distance(np.zeros(3), sigma, np.ones(3), bad))
