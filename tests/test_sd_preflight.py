"""The pre-flight of text-to-image runs (cm_jax/preflight.py): the abstract Stable Diffusion space built from config
files alone (a pipeline folder without weights, or the public architectures of cm_jax/models/sd_configs.py), and a
tiny sd_unet ddpm train step compiled for the host CPU with finite memory and FLOPs."""

import json

import jax
import ml_collections
import numpy as np
from PIL import Image
import pytest

from cm_jax import digits_pipeline
from cm_jax import modes
from cm_jax import preflight
from cm_jax import text_latents
from cm_jax.models import sd_configs
from configs import digits_t2i_ddpm
from configs import sd15_sample
import sd_fixtures

# A pipeline folder holding config files only: no safetensors anywhere, so nothing but configs can be read.
TINY = dict(
    unet=dict(_class_name='UNet2DConditionModel', sample_size=8, in_channels=4, out_channels=4, norm_num_groups=8,
              block_out_channels=[32, 64], layers_per_block=1, cross_attention_dim=32, attention_head_dim=8,
              down_block_types=['CrossAttnDownBlock2D', 'DownBlock2D'], up_block_types=['UpBlock2D',
                                                                                        'CrossAttnUpBlock2D']),
    vae=dict(_class_name='AutoencoderKL', in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=8,
             block_out_channels=[8, 16], layers_per_block=1, down_block_types=['DownEncoderBlock2D'] * 2,
             up_block_types=['UpDecoderBlock2D'] * 2, scaling_factor=0.18215),
    text_encoder=dict(architectures=['CLIPTextModel'], vocab_size=551, hidden_size=32, intermediate_size=37,
                      num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
                      hidden_act='quick_gelu', eos_token_id=550),
    scheduler=dict(_class_name='DDIMScheduler', num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                   beta_schedule='scaled_linear', prediction_type='epsilon'))


def write_config_only_pipeline(folder):
  index = {'_class_name': 'StableDiffusionPipeline', 'unet': ['diffusers', 'UNet2DConditionModel'],
           'vae': ['diffusers', 'AutoencoderKL'], 'text_encoder': ['transformers', 'CLIPTextModel'],
           'tokenizer': ['transformers', 'CLIPTokenizer'], 'scheduler': ['diffusers', 'DDIMScheduler']}
  (folder / 'model_index.json').write_text(json.dumps(index))
  files = {'unet': 'config.json', 'vae': 'config.json', 'text_encoder': 'config.json',
           'scheduler': 'scheduler_config.json'}
  for name, file in files.items():
    (folder / name).mkdir()
    (folder / name / file).write_text(json.dumps(TINY[name]))
  (folder / 'tokenizer').mkdir()  # no vocabulary either: the pre-flight tokenises nothing
  return folder


def _tiny_config(pipeline: str):
  c = sd15_sample.sd_sampling(32)
  c.latent.pipeline = pipeline
  c.train.batch_size = 2
  c.model.dtype = 'float32'  # host CPU
  return c


@pytest.mark.parametrize('name', sorted(sd_configs.ARCHITECTURES))
def test_public_architectures_build_abstractly(name):
  c = sd15_sample.sd_sampling(sd_configs.ARCHITECTURES[name]['resolution'])
  mesh = jax.sharding.Mesh(np.array(jax.devices('cpu')[:1]), ('data',))
  space, source = preflight.abstract_space(c, mesh, name)
  unet = sd_configs.ARCHITECTURES[name]['unet']
  assert space.shape == (unet['sample_size'],) * 2 + (4,)
  assert source.fields == (('caption_ids', (len(sd_configs.ARCHITECTURES[name]['text_encoders']), 77), np.int32),)
  assert source.shape == (sd_configs.ARCHITECTURES[name]['resolution'],) * 2 + (3,)
  assert space.unet_config['cross_attention_dim'] == unet['cross_attention_dim']
  leaves = jax.tree.leaves(space.params)
  assert leaves and all(isinstance(a, jax.ShapeDtypeStruct) for a in leaves)  # nothing materialised
  width = sum(e['hidden_size'] for e in sd_configs.ARCHITECTURES[name]['text_encoders'])
  condition = space.example_condition(1)
  assert condition.hidden_states.shape == (1, 77, width) == (1, 77, unet['cross_attention_dim'])


def test_guess_and_unknown_architecture():
  assert sd_configs.guess(512) == 'sd15' and sd_configs.guess(1024) == 'sdxl'
  assert sd_configs.guess(512, 'v') == 'sd21_base'
  with pytest.raises(ValueError, match='known'):
    sd_configs.architecture('sd3')


def test_data_records_of_captioned_names():
  data = lambda name, size=0: type('D', (), dict(name=name, image_size=size))
  assert preflight.data_record(data('captioned_digits')) == ((8, 8, 1), np.dtype(np.float32))
  for name in ('captioned_folder', 'webdataset', 'prompts'):
    assert preflight.data_record(data(name, 64)) == ((64, 64, 3), np.dtype(np.uint8))
  with pytest.raises(ValueError, match='image_size'):
    preflight.data_record(data('webdataset'))


def test_tiny_sd_unet_train_step_compiles_from_config_files(tmp_path):
  report = preflight.run(_tiny_config(str(write_config_only_pipeline(tmp_path))), 'cpu:1', sampler=False)
  assert report.exp.text_conditioned
  assert report.step is not None and report.fits
  assert 0 < report.step.hbm_bytes < 2**30 and np.isfinite(report.step.flops) and report.step.flops > 0
  assert np.isfinite(report.step_seconds()) and 0 < report.mfu() <= 1.0
  lines = preflight.describe(report)
  assert 'text-to-image' in lines[1] and lines[-1].startswith('preflight: fits=yes')


def _cached_config(root, family: str):
  """digits_t2i_ddpm (the pixel pipeline) or a tiny SDXL pipeline (VAE moments, pooled states) on four captioned
  16x16 images, with latent.cache written by --mode=encode."""
  if family == 'digits':
    c = digits_t2i_ddpm.get_config()
  else:
    c = sd15_sample.sd_sampling(16)
    data = root / 'data'
    data.mkdir()
    with open(data / 'metadata.jsonl', 'w') as f:
      for i in range(4):
        Image.fromarray(np.full((16, 16, 3), 40 * i, np.uint8)).save(data / f'{i}.png')
        f.write(json.dumps({'file_name': f'{i}.png', 'text': f'a photo of {i} cats'}) + '\n')
    c.data = ml_collections.ConfigDict(dict(c.data, name='captioned_folder', path=str(data), workers=0))
    c.latent.pipeline = str(sd_fixtures.write_pipeline(root / 'sdxl', 'sdxl'))
    c.model.dtype = 'float32'
  c.latent.cache, c.latent.caption_dropout, c.train.batch_size = str(root / 'cache'), 0.5, 4
  modes.encode(c, '')
  return c


@pytest.mark.parametrize('family', ['digits', 'sdxl'])
def test_a_cached_text_to_image_space_and_batch_are_the_cached_runs(tmp_path, monkeypatch, family):
  """latent.cache: the abstract batch holds the fields the cache's records hand the step (shapes and dtypes of a real
  batch), and the abstract space's parameters are the cached run's (the empty prompt's states in NULL_TEXT)."""
  monkeypatch.setattr(digits_pipeline, 'CACHE_DIR', str(tmp_path / 'pipelines'))
  c = _cached_config(tmp_path, family)
  space, source = text_latents.build(c)
  exp = preflight.abstract_experiment(c, jax.devices('cpu')[:1])
  real = source.get(np.arange(c.train.batch_size))
  batch = preflight.abstract_batch(exp)
  assert {k: (v.shape, np.dtype(v.dtype)) for k, v in batch.items()} == {k: (v.shape, v.dtype) for k, v in real.items()}
  extra = {'logvar', text_latents.POOLED} if family == 'sdxl' else set()  # the VAE's log-variances, SDXL's pooled
  assert set(batch) == {'image', 'label', text_latents.HIDDEN} | extra
  assert batch[text_latents.HIDDEN].dtype == np.float16
  assert exp.space.cached and space.cached and exp.space.shape == space.shape
  assert getattr(exp.space.latent, 'online', False) is False
  shapes = lambda tree: jax.tree.map(lambda a: (tuple(a.shape), np.dtype(a.dtype)), tree)
  assert shapes(exp.space.params) == shapes(space.params)
  assert all(isinstance(a, jax.ShapeDtypeStruct) for a in jax.tree.leaves(exp.space.params))
