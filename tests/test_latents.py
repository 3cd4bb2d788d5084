"""The latent space (latents.py): the diffusers AutoencoderKL format -- every tensor's place and layout, the older
attention names, the errors of a bad folder --, equality with diffusers' PyTorch AutoencoderKL where it is installed,
the export round trip, the normalisations and the latent cache of --mode=encode.

tests/data/tiny_autoencoder_kl_layout.json is the state-dict layout (names and shapes) and config.json that
diffusers 0.42 writes for AutoencoderKL(in_channels=1, block_out_channels=(8, 16), layers_per_block=1,
latent_channels=2, norm_num_groups=4): the real format, recorded once, so that the loader is tested without PyTorch.
"""

import json
import pathlib
import re

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from safetensors import numpy as safetensors_numpy

from cm_jax import latents
from cm_jax.data import load_digits

LAYOUT = json.loads((pathlib.Path(__file__).parent / 'data' / 'tiny_autoencoder_kl_layout.json').read_text())


def _tensors(seed=0):
  rng = np.random.default_rng(seed)
  return {k: (0.3 * rng.standard_normal(shape) + (1.0 if k.endswith('norm1.weight') else 0.0)).astype(np.float32)
          for k, shape in LAYOUT['tensors'].items()}


def _write(folder, tensors=None, config=None):
  folder = pathlib.Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  tensors = _tensors() if tensors is None else tensors
  safetensors_numpy.save_file(tensors, str(folder / 'diffusion_pytorch_model.safetensors'))
  (folder / 'config.json').write_text(json.dumps(LAYOUT['config'] if config is None else config))
  return folder


def _expected_flax(key, value):
  """Where diffusers' tensor `key` must land and how, written out independently of latents.py."""
  parts = key.split('.')
  path = []
  for p in parts:
    if p.isdigit():
      path[-1] = f'{path[-1]}_{p}'
    else:
      path.append(p)
  if path[-1] == 'weight':
    path[-1] = 'scale' if value.ndim == 1 else 'kernel'
  if value.ndim == 4:
    value = value.transpose(2, 3, 1, 0)  # [out, in, h, w] -> [h, w, in, out]
  elif value.ndim == 2:
    value = value.T  # [out, in] -> [in, out]
  return '/'.join(path), value


def test_every_tensor_lands_in_its_flax_place_and_layout(tmp_path):
  tensors = _tensors()
  autoencoder = latents.load_diffusers_autoencoder(_write(tmp_path, tensors))
  flat = flax.traverse_util.flatten_dict(autoencoder.params, sep='/')
  assert len(flat) == len(tensors) == 124
  for key, value in tensors.items():
    path, expected = _expected_flax(key, value)
    np.testing.assert_array_equal(flat[path], expected, err_msg=key)
  assert autoencoder.scaling_factor == 0.18215 and autoencoder.shift_factor == 0.0
  assert autoencoder.module.latent_shape((8, 8, 1)) == (4, 4, 2)


def test_the_older_attention_names_load_the_same(tmp_path):
  """query / key / value / proj_attn (older diffusers checkpoints) are to_q / to_k / to_v / to_out.0."""
  tensors = _tensors()
  legacy = {re.sub(r'to_q', 'query', re.sub(r'to_k', 'key', re.sub(r'to_v', 'value', k.replace('to_out.0', 'proj_attn')))): v
            for k, v in tensors.items()}
  assert 'encoder.mid_block.attentions.0.proj_attn.weight' in legacy
  new = latents.load_diffusers_autoencoder(_write(tmp_path / 'new', tensors))
  old = latents.load_diffusers_autoencoder(_write(tmp_path / 'old', legacy))
  jax.tree.map(np.testing.assert_array_equal, new.params, old.params)


def test_a_bad_folder_is_one_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match='diffusion_pytorch_model.safetensors'):
    latents.load_diffusers_autoencoder(tmp_path / 'empty')
  folder = _write(tmp_path / 'garbage')
  (folder / 'diffusion_pytorch_model.safetensors').write_bytes(b'\x00garbage' * 20)
  with pytest.raises(ValueError, match='not a readable safetensors file'):
    latents.load_diffusers_autoencoder(folder)
  folder = _write(tmp_path / 'truncated')
  data = (folder / 'diffusion_pytorch_model.safetensors').read_bytes()
  (folder / 'diffusion_pytorch_model.safetensors').write_bytes(data[:len(data) // 2])
  with pytest.raises(ValueError, match='not a readable safetensors file'):
    latents.load_diffusers_autoencoder(folder)
  with pytest.raises(ValueError, match="describes a 'UNet2DConditionModel', not an AutoencoderKL"):
    latents.load_diffusers_autoencoder(_write(tmp_path / 'unet', config=dict(LAYOUT['config'],
                                                                             _class_name='UNet2DConditionModel')))
  folder = _write(tmp_path / 'json')
  (folder / 'config.json').write_text('{"_class_name": ')
  with pytest.raises(ValueError, match='not valid JSON'):
    latents.load_diffusers_autoencoder(folder)
  tensors = _tensors()
  tensors['encoder.conv_in.weight'] = np.zeros((8, 3, 3, 3), np.float32)
  with pytest.raises(ValueError, match=r'encoder.conv_in.weight has shape \(8, 3, 3, 3\).*needs \(3, 3, 1, 8\)'):
    latents.load_diffusers_autoencoder(_write(tmp_path / 'shape', tensors))
  tensors = _tensors()
  del tensors['decoder.conv_out.bias']
  with pytest.raises(ValueError, match='lacks the tensor decoder.conv_out.bias'):
    latents.load_diffusers_autoencoder(_write(tmp_path / 'missing', tensors))
  tensors = dict(_tensors(), **{'encoder.extra.weight': np.zeros((2, 2), np.float32)})
  with pytest.raises(ValueError, match='encoder.extra.weight'):
    latents.load_diffusers_autoencoder(_write(tmp_path / 'extra', tensors))


def test_export_round_trip(tmp_path):
  autoencoder = latents.load_diffusers_autoencoder(_write(tmp_path / 'in'))
  latents.export_diffusers(tmp_path / 'out', autoencoder.module, autoencoder.params, 0.7, 8)
  again = latents.load_diffusers_autoencoder(tmp_path / 'out')
  jax.tree.map(np.testing.assert_array_equal, autoencoder.params, again.params)
  assert again.scaling_factor == 0.7
  written = safetensors_numpy.load_file(str(tmp_path / 'out' / 'diffusion_pytorch_model.safetensors'))
  assert set(written) == set(LAYOUT['tensors'])
  assert {k: list(v.shape) for k, v in written.items()} == LAYOUT['tensors']


def test_encode_and_decode_match_diffusers(tmp_path):
  """Our Flax AutoencoderKL computes what diffusers' PyTorch one does, both ways, on random weights."""
  torch = pytest.importorskip('torch')
  diffusers = pytest.importorskip('diffusers')
  torch.manual_seed(0)
  config = {k: v for k, v in LAYOUT['config'].items() if not k.startswith('_')}
  reference = diffusers.AutoencoderKL(**config).eval()
  with torch.no_grad():  # random norms and biases too, so that every parameter matters
    for p in reference.parameters():
      p.add_(0.1 * torch.randn_like(p))
  reference.save_pretrained(tmp_path / 'vae', safe_serialization=True)
  ours = latents.load_diffusers_autoencoder(tmp_path / 'vae')
  images = np.random.default_rng(0).uniform(-1, 1, (3, 8, 8, 1)).astype(np.float32)
  with torch.no_grad():
    nchw = torch.from_numpy(images.transpose(0, 3, 1, 2))
    mean = reference.encode(nchw).latent_dist.mean * config['scaling_factor']
    decoded = reference.decode(mean / config['scaling_factor']).sample
  np.testing.assert_allclose(ours.encode(images), mean.numpy().transpose(0, 2, 3, 1), atol=1e-4, rtol=1e-4)
  latent = mean.numpy().transpose(0, 2, 3, 1)
  np.testing.assert_allclose(ours.decode(latent), decoded.numpy().transpose(0, 2, 3, 1), atol=1e-4, rtol=1e-4)
  # diffusers reads what cm_jax exports
  latents.export_diffusers(tmp_path / 'export', ours.module, ours.params, config['scaling_factor'], 8)
  again = diffusers.AutoencoderKL.from_pretrained(tmp_path / 'export').eval()
  with torch.no_grad():
    np.testing.assert_allclose(again.encode(nchw).latent_dist.mean.numpy(),
                               (mean / config['scaling_factor']).numpy(), atol=1e-5)


def test_normalisations_and_their_inverse():
  autoencoder = latents.Autoencoder(None, None, scaling_factor=2.0, shift_factor=0.5, path='x')
  raw = jnp.asarray(np.random.default_rng(0).standard_normal((3, 2, 2, 2)), jnp.float32)
  by_factor = latents.LatentSpace(autoencoder, (2, 2, 2), 'scaling_factor', True, 'mean', None)
  np.testing.assert_allclose(by_factor.normalize(raw), (raw - 0.5) * 2.0, rtol=1e-6)
  mean, std = jnp.full((2, 2, 2), 0.3), jnp.linspace(0.5, 2.0, 8).reshape(2, 2, 2)
  by_stats = latents.LatentSpace(autoencoder, (2, 2, 2), 'per_element', False, 'mean', (mean, std))
  np.testing.assert_allclose(by_stats.normalize(raw), (raw - 0.3) / std * 0.5, rtol=1e-6)
  for space in (by_factor, by_stats):
    np.testing.assert_allclose(space.denormalize(space.normalize(raw)), raw, rtol=1e-5, atol=1e-6)


def test_stored_pixels_are_scaled_on_the_devices_before_the_network(tmp_path):
  """Image sets hand uint8 pixels to the train step (data/source.py); `prepare` maps them to [-1, 1] inside the jitted
  step, x / 127.5 - 1, for the pixel space and before an online encoder; float records pass unchanged."""
  pixels = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 1)).astype(np.uint8)
  pixels[0, 0, 0, 0], pixels[0, 0, 1, 0] = 0, 255
  expected = (2.0 * pixels.astype(np.float64) - 255.0) / 255.0  # by hand: 0 -> -1, 255 -> 1
  labels = np.zeros(3, np.int32)
  prepared = jax.jit(latents.PixelSpace((8, 8, 1)).prepare)(None, {'image': pixels, 'label': labels}, None)
  assert prepared['image'].dtype == jnp.float32
  np.testing.assert_allclose(prepared['image'], expected, atol=1e-6)
  floats = expected.astype(np.float32)
  np.testing.assert_array_equal(latents.PixelSpace((8, 8, 1)).prepare(None, {'image': floats}, None)['image'], floats)
  autoencoder = latents.load_diffusers_autoencoder(_write(tmp_path / 'vae'))
  online = latents.LatentSpace(autoencoder, (4, 4, 2), 'scaling_factor', True, 'mean', None, autoencoder.params)
  encoded = jax.jit(online.prepare)(autoencoder.params, {'image': pixels, 'label': labels}, None)['image']
  np.testing.assert_allclose(encoded, autoencoder.encode(floats), rtol=1e-5, atol=1e-5)


def _latent_config(autoencoder, cache='', normalization='scaling_factor'):
  return ml_collections.ConfigDict(dict(
      data=dict(name='digits', split='train', data_dir='', path='', image_size=0, num_records=0, seed=0),
      latent=dict(autoencoder=str(autoencoder), cache=str(cache), posterior='mean', normalization=normalization,
                  encode_batch_size=500)))


def test_latent_cache_holds_the_encoder_means_and_their_statistics(tmp_path):
  folder = _write(tmp_path / 'vae')
  config = _latent_config(folder, tmp_path / 'cache', 'per_element')
  cache = latents.write_cache(config, config.latent.cache)
  images, labels = load_digits('train')
  autoencoder = latents.load_diffusers_autoencoder(folder)
  assert len(cache) == len(images) == 1437 and cache.shape == (4, 4, 2) and cache.num_classes == 10
  records = cache.get(np.arange(len(cache)))
  expected = np.asarray(autoencoder.encode(images)) / autoencoder.scaling_factor
  np.testing.assert_allclose(records['image'], expected, rtol=1e-4, atol=1e-5)
  np.testing.assert_array_equal(records['label'], labels)
  np.testing.assert_allclose(cache.stats['element_mean'], records['image'].mean(0), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(cache.stats['element_std'], records['image'].std(0), rtol=1e-3)
  np.testing.assert_allclose(cache.stats['channel_std'], records['image'].reshape(-1, 2).std(0), rtol=1e-3)
  space, source = latents.build(config)
  assert source.shape == space.shape == (4, 4, 2) and not space.online
  batch = space.prepare(None, source.get(np.arange(4)), None)
  np.testing.assert_allclose(batch['image'], (expected[:4] - records['image'].mean(0)) / records['image'].std(0) * 0.5,
                             rtol=1e-3, atol=1e-4)
  with pytest.raises(ValueError, match='already holds a latent cache'):
    latents.write_cache(config, config.latent.cache)


def test_latent_settings_that_cannot_work_are_refused(tmp_path):
  three_channels = _write(tmp_path / 'rgb', _tensors() | {}, dict(LAYOUT['config'], in_channels=3, out_channels=3))
  with pytest.raises(ValueError):  # the tensors are those of a 1-channel autoencoder
    latents.build(_latent_config(three_channels))
  rgb = tmp_path / 'rgb_export'
  module = latents.module_from_config(dict(LAYOUT['config'], in_channels=3, out_channels=3), 'x')
  params = module.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)))['params']
  latents.export_diffusers(rgb, module, params, 1.0, 8)
  with pytest.raises(ValueError, match=r'takes images with 3 channels .* data has shape \(8, 8, 1\)'):
    latents.build(_latent_config(rgb))
  with pytest.raises(ValueError, match='needs|uses the data set'):
    latents.build(_latent_config(rgb, normalization='per_channel'))
  with pytest.raises(FileNotFoundError, match='--mode=encode'):
    latents.build(_latent_config(_write(tmp_path / 'vae'), tmp_path / 'no_cache'))
  run = tmp_path / 'unfinished_run'
  (run / 'checkpoints').mkdir(parents=True)
  with pytest.raises(FileNotFoundError, match='has no export'):
    latents.build(_latent_config(run))
