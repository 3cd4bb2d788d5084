"""The pre-flight of text-to-image runs (cm_jax/preflight.py): the abstract Stable Diffusion space built from config
files alone (a pipeline folder without weights, or the public architectures of cm_jax/models/sd_configs.py), and a
tiny sd_unet ddpm train step compiled for the host CPU with finite memory and FLOPs."""

import json

import jax
import numpy as np
import pytest

from cm_jax import preflight
from cm_jax.models import sd_configs
from configs import sd15_sample

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
  assert source.caption_shape == (len(sd_configs.ARCHITECTURES[name]['text_encoders']), 77)
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
