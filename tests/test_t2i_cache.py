"""The latent cache of a text-to-image run (--mode=encode with latent.pipeline; text_latents.cache_encoding): per record
the VAE's posterior moments, the text encoders' states of its caption (float16) and the caption, written by the
class-conditional cache's writer; a run with latent.cache trains from it, its prepared batches those of the
on-the-fly path to float16's precision, and resumes; a cache of another pipeline or data, or a damaged shard, is one
line that names it. On tiny diffusers pipelines (sd_fixtures) and a few captioned images."""

import json
import shutil

import jax
import ml_collections
import numpy as np
from PIL import Image
import pytest

from cm_jax import checkpoint
from cm_jax import experiment
from cm_jax import latents
from cm_jax import modes
from cm_jax import text_latents
from cm_jax import train
from configs import sd15_sample
from helpers import run_main
import sd_fixtures

SIDE = 16  # pixels: the tiny VAE makes 8x8x4 latents
NUM_RECORDS = 7
F16 = 2.0**-11  # float16's relative rounding error (unit roundoff)
# A one-level UNet with cross-attention on the sd21 fixture's 32-wide text states (trained from scratch: a third of
# the fixture UNet's compile time).
SMALL_UNET = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16,), layers_per_block=1,
                  down_block_types=('CrossAttnDownBlock2D',), up_block_types=('CrossAttnUpBlock2D',),
                  cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8, use_linear_projection=True)
CAPTIONS = ('a photo of a cat', 'the digit seven', 'a dog', 'a handwritten seven', 'the astronaut')


@pytest.fixture(scope='module')
def folders(tmp_path_factory):
  """{'sd21', 'sdxl': tiny pipeline folders, 'data': a captioned folder of NUM_RECORDS images, 'root'}."""
  root = tmp_path_factory.mktemp('t2i_cache')
  data = root / 'data'
  data.mkdir()
  rng = np.random.default_rng(0)
  with open(data / 'metadata.jsonl', 'w') as f:
    for i in range(NUM_RECORDS):
      Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(data / f'{i}.png')
      f.write(json.dumps({'file_name': f'{i}.png', 'text': CAPTIONS[i % len(CAPTIONS)]}) + '\n')
  return {'sd21': sd_fixtures.write_pipeline(root / 'sd21', 'sd21'),
          'sdxl': sd_fixtures.write_pipeline(root / 'sdxl', 'sdxl'), 'data': data, 'root': root}


def _config(folders, family='sd21', cache='', dropout=0.5, posterior='mean'):
  c = sd15_sample.sd_sampling(SIDE, 'v' if family == 'sd21' else 'epsilon')
  c.data = ml_collections.ConfigDict(dict(c.data, name='captioned_folder', path=str(folders['data']), workers=0))
  c.latent.update(pipeline=str(folders[family]), cache=str(cache), caption_dropout=dropout, posterior=posterior,
                  encode_batch_size=3)  # chunks of 3, 3 and 1 records
  c.model.dtype = 'float32'
  c.train.batch_size, c.train.num_steps, c.train.log_every = 2, 2, 1
  c.eval.num_samples, c.sampling.num_grid, c.sampling.teacher_steps = 2, 2, 2
  c.checkpoint.async_save = False
  c.optim.learning_rate = 1e-3
  return c


@pytest.fixture(scope='module')
def caches(folders):
  """{family: the cache directory} written by --mode=encode."""
  out = {}
  for family in ('sd21', 'sdxl'):
    out[family] = folders['root'] / f'cache_{family}'
    modes.encode(_config(folders, family, out[family]), '')
  return out


def _close(a, b, relative):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  assert a.shape == b.shape
  np.testing.assert_array_less(np.abs(a - b), relative * np.abs(b) + 1e-6)


@pytest.mark.parametrize('family,posterior', [('sd21', 'sample'), ('sdxl', 'mean')])
def test_the_cached_batch_is_the_on_the_fly_batch(folders, caches, family, posterior):
  """Same records, same step key: the same latents (the posterior sample from the cached moments), the same caption
  dropout, the kept captions' states to float16's precision and the dropped ones the empty prompt's."""
  cached_space, cached = text_latents.build(_config(folders, family, caches[family], posterior=posterior))
  space, source = text_latents.build(_config(folders, family, posterior=posterior))
  assert cached_space.cached and not space.cached and len(cached) == len(source) == NUM_RECORDS
  assert cached.captions(np.arange(NUM_RECORDS)) == source.captions(np.arange(NUM_RECORDS))
  indices = np.array([6, 0, 3, 5, 1, 2, 4, 0])
  rng = jax.random.PRNGKey(5)
  ours = jax.jit(cached_space.prepare)(cached_space.params, cached.get(indices), rng)
  theirs = jax.jit(space.prepare)(space.params, source.get(indices), rng)
  assert sorted(ours) == sorted(theirs) == ['image', 'label', 'text']
  nan = lambda tree: jax.tree.map(lambda a: np.full(a.shape, np.nan, a.dtype), tree)
  poisoned = dict(cached_space.params, autoencoder=nan(cached_space.params['autoencoder']),
                  text_encoders=nan(cached_space.params['text_encoders']))
  again = jax.jit(cached_space.prepare)(poisoned, cached.get(indices), rng)
  jax.tree.map(np.testing.assert_array_equal, again, ours)  # the step runs neither the VAE nor the text encoders
  np.testing.assert_allclose(ours['image'], theirs['image'], rtol=1e-5, atol=1e-5)
  mean = np.asarray(space.latent.autoencoder.encode(source.get(indices)['image'].astype(np.float32) / 127.5 - 1))
  assert (np.abs(np.asarray(theirs['image']) - mean).max() > 1e-3) == (posterior == 'sample')
  text, expected = ours['text'], theirs['text']
  empty = space.pipe.encode_prompt([''])
  dropped = np.all(np.abs(np.asarray(expected.hidden_states) - np.asarray(empty[0])) < 1e-5, axis=(1, 2))
  assert 0 < dropped.sum() < len(indices)  # both branches are in the batch
  _close(text.hidden_states, expected.hidden_states, F16)
  np.testing.assert_array_equal(np.asarray(text.hidden_states)[dropped], np.broadcast_to(empty[0], (dropped.sum(),)
                                                                                         + empty[0].shape[1:]))
  np.testing.assert_allclose(text.null_hidden_states, expected.null_hidden_states, atol=1e-5)
  if family == 'sdxl':
    _close(text.pooled, expected.pooled, F16)
    np.testing.assert_array_equal(text.time_ids, expected.time_ids)
    assert np.asarray(text.time_ids)[0].tolist() == [SIDE, SIDE, 0, 0, SIDE, SIDE]
  else:
    assert text.pooled is None and expected.pooled is None


def test_the_cache_holds_float16_states_of_each_records_caption(folders, caches):
  """The records against the pipeline's encoders on their captions (float32): the float16 rounding, and no more."""
  cache = latents.LatentCacheSource(caches['sdxl'])
  assert cache.meta['text_dtype'] == 'float16' and cache.meta['fields']['hidden_states'] == 'float16'
  batch = cache.get(np.arange(NUM_RECORDS))
  pipe = text_latents.pipeline(str(folders['sdxl'].resolve()))
  hidden, pooled = pipe.encode_prompt(cache.captions(np.arange(NUM_RECORDS)))
  assert batch['hidden_states'].dtype == np.float16 and batch['hidden_states'].shape == (NUM_RECORDS, 77, 80)
  _close(batch['hidden_states'], hidden, F16)
  _close(batch['pooled'], pooled, F16)
  np.testing.assert_array_equal(batch['hidden_states'], np.asarray(hidden).astype(np.float16))
  error = np.abs(batch['hidden_states'].astype(np.float64) - np.asarray(hidden, np.float64))
  assert error.max() > 0  # float16, not float32
  mean, logvar = pipe.autoencoder.posterior(
      text_latents._source(_config(folders, 'sdxl'), pipe).get(np.arange(NUM_RECORDS))['image'] / 127.5 - 1)
  np.testing.assert_allclose(batch['image'], mean, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(batch['logvar'], logvar, rtol=1e-5, atol=1e-6)


def test_encode_again_train_from_the_cache_and_resume(folders, caches, tmp_path, capsys):
  """Re-encoding says the cache is there and rewrites nothing; the trainer's restore (train.restore_or_init) and data
  position (Experiment.batches) resume a run from the cache at step 2 to the parameters of 3 steps in one go."""
  config = _config(folders, 'sd21', caches['sd21'])
  before = {p.name: p.stat().st_mtime_ns for p in caches['sd21'].iterdir()}
  modes.encode(config, '')
  assert (f'The latent cache {caches["sd21"]} is already there: {NUM_RECORDS} records of shape (8, 8, 4), of this '
          'pipeline and data') in capsys.readouterr().out
  assert {p.name: p.stat().st_mtime_ns for p in caches['sd21'].iterdir()} == before
  config.model.unet = SMALL_UNET
  exp = experiment.Experiment(config, jax.devices()[:1])
  assert exp.space.cached and exp.source.directory == caches['sd21']
  step, frozen = exp.train_step(), exp.frozen()  # one compilation for both runs
  ckpt = checkpoint.Checkpointer(tmp_path, async_save=False, writer=True)
  state, batches = exp.init_state(), exp.batches(0)
  initial = jax.device_get(state.params)
  for k in (1, 2, 3):
    state, metrics = step(state, next(batches), frozen)
    assert np.isfinite(float(metrics['loss']))
    if k == 2:
      ckpt.save(2, state, {'position': 2, 'seed': config.seed}, force=True)
  straight = jax.device_get(state.params)
  batches.close()
  resumed = train.restore_or_init(exp, ckpt)
  assert int(resumed.step) == 2
  with exp.batches(int(resumed.step)) as batches:
    resumed, _ = step(resumed, next(batches), frozen)
  ckpt.close()
  assert int(resumed.step) == 3
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(resumed.params), straight)
  moved = jax.tree.leaves(jax.tree.map(lambda a, b: np.abs(a - b).max(), straight, initial))
  assert max(moved) > 1e-4  # the three steps trained


def test_a_cache_of_another_pipeline_or_data_is_refused_in_one_line(folders, caches, tmp_path):
  other = shutil.copytree(folders['sd21'], tmp_path / 'other_sd21')
  config = _config(folders, 'sd21', caches['sd21'])
  config.latent.pipeline = str(other)
  for refuse in (lambda: latents.complete_cache(config, config.latent.cache), lambda: text_latents.build(config)):
    with pytest.raises(ValueError) as raised:
      refuse()
    message = str(raised.value)
    assert '\n' not in message and (f'The latent cache {caches["sd21"]} was encoded with latent.pipeline='
                                    f'{folders["sd21"].resolve()}, text_dtype float16, not with latent.pipeline='
                                    f'{other.resolve()}') in message, message
  config = _config(folders, 'sd21', caches['sd21'])
  config.data.image_size = 8
  with pytest.raises(ValueError, match=r'encoded from other data \(data.image_size is 16 there, 8 here\)'):
    text_latents.build(config)
  result = run_main('--config=configs/sd15_sample.py', f'--workdir={tmp_path / "run"}', '--mode=encode',
                    f'--config.latent.pipeline={folders["sdxl"]}', f'--config.latent.cache={caches["sd21"]}',
                    '--config.data.name=captioned_folder', f'--config.data.path={folders["data"]}',
                    f'--config.data.image_size={SIDE}')
  errors = [line for line in result.stderr.splitlines() if line.startswith('cm_jax: error:')]
  assert result.returncode == 1 and len(errors) == 1, result.stderr[-2000:]
  assert f'was encoded with latent.pipeline={folders["sd21"].resolve()}' in errors[0]


@pytest.mark.parametrize('damage', ['cut short', 'garbage'])
def test_a_corrupt_shard_is_named(folders, caches, tmp_path, damage):
  copy = shutil.copytree(caches['sd21'], tmp_path / 'copy')
  shard = next(copy.glob('*.array_record'))
  data = shard.read_bytes()
  shard.write_bytes(data[:len(data) // 2] if damage == 'cut short' else b'garbage' * 100)
  with pytest.raises(ValueError) as raised:
    text_latents.build(_config(folders, 'sd21', copy))
  message = str(raised.value)
  assert '\n' not in message and f'The shard {shard} of the latent cache is unreadable' in message, message
