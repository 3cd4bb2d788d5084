"""cm_jax.models.sd_unet against diffusers' UNet2DConditionModel: tiny random SD-1.x, SD-2.x, SDXL and LCM-style UNets
saved by diffusers load by name and give its outputs; exports load back in diffusers; bad folders are refused."""

import json

import numpy as np
import pytest

from cm_jax.models import sd_unet

torch = pytest.importorskip('torch')
diffusers = pytest.importorskip('diffusers')

BATCH, SIDE, TEXT_LENGTH, TEXT_WIDTH = 3, 16, 7, 32
TIMESTEPS = np.array([1, 500, 999], np.float32)
_BASE = dict(sample_size=SIDE, in_channels=4, out_channels=4, norm_num_groups=8, block_out_channels=(32, 64),
             down_block_types=('CrossAttnDownBlock2D', 'DownBlock2D'), up_block_types=('UpBlock2D', 'CrossAttnUpBlock2D'),
             cross_attention_dim=TEXT_WIDTH)
KINDS = {
    # SD 1.x: attention_head_dim=8 is the number of heads of every block, conv proj_in / proj_out.
    'sd1': dict(layers_per_block=2, attention_head_dim=8),
    # SD 2.x: per-block heads, linear projections, upcast attention.
    'sd2': dict(layers_per_block=1, attention_head_dim=(4, 8), use_linear_projection=True, upcast_attention=True),
    # SDXL: attention at the lower level only, two transformer layers there, text_time from 24 pooled + 6 time ids.
    'sdxl': dict(layers_per_block=1, attention_head_dim=(2, 4), use_linear_projection=True,
                 transformer_layers_per_block=(1, 2), addition_embed_type='text_time', addition_time_embed_dim=8,
                 projection_class_embeddings_input_dim=24 + 6 * 8,
                 down_block_types=('DownBlock2D', 'CrossAttnDownBlock2D'),
                 up_block_types=('CrossAttnUpBlock2D', 'UpBlock2D')),
    # LCM: the guidance-scale embedding through time_embedding.cond_proj; with class labels too.
    'lcm': dict(layers_per_block=1, attention_head_dim=8, time_cond_proj_dim=16, num_class_embeds=5),
}


def _diffusers_unet(kind: str, seed: int = 0):
  """A random diffusers UNet of `kind`, every parameter moved by N(0, 0.05^2) so that zero-initialised layers
  (conv_out, biases) take part."""
  torch.manual_seed(seed)
  unet = diffusers.UNet2DConditionModel(**{**_BASE, **KINDS[kind]})
  with torch.no_grad():
    for p in unet.parameters():
      p.add_(0.05 * torch.randn_like(p))
  return unet.eval()


@pytest.fixture(scope='module')
def saved(tmp_path_factory):
  """kind -> (folder written by save_pretrained, the diffusers module), built on first use."""
  cache = {}

  def get(kind):
    if kind not in cache:
      unet = _diffusers_unet(kind)
      folder = tmp_path_factory.mktemp(kind)
      unet.save_pretrained(str(folder))
      cache[kind] = (folder, unet)
    return cache[kind]
  return get


def _inputs(kind: str, seed: int = 0):
  """(cm_jax args, kwargs) with NHWC latents and (diffusers args, kwargs) of the same random inputs."""
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((BATCH, SIDE, SIDE, 4)).astype(np.float32)
  text = rng.standard_normal((BATCH, TEXT_LENGTH, TEXT_WIDTH)).astype(np.float32)
  ours, theirs = {}, {}
  if kind == 'sdxl':
    pooled = rng.standard_normal((BATCH, 24)).astype(np.float32)
    time_ids = rng.uniform(0, 1024, (BATCH, 6)).astype(np.float32)
    ours['added_cond'] = dict(text_embeds=pooled, time_ids=time_ids)
    theirs['added_cond_kwargs'] = dict(text_embeds=torch.tensor(pooled), time_ids=torch.tensor(time_ids))
  if kind == 'lcm':
    guidance = rng.standard_normal((BATCH, 16)).astype(np.float32)
    labels = np.array([0, 3, 4])
    ours.update(timestep_cond=guidance, class_labels=labels)
    theirs.update(timestep_cond=torch.tensor(guidance), class_labels=torch.tensor(labels))
  args = (x, TIMESTEPS, text)
  torch_args = (torch.tensor(x.transpose(0, 3, 1, 2)), torch.tensor(TIMESTEPS), torch.tensor(text))
  return (args, ours), (torch_args, theirs)


def _reference(unet, kind):
  (_, _), (args, kwargs) = _inputs(kind)
  with torch.no_grad():
    return unet(*args, **kwargs).sample.numpy().transpose(0, 2, 3, 1)


def _relative_error(out, ref):
  return float(np.abs(np.asarray(out) - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize('kind', sorted(KINDS))
def test_matches_diffusers(saved, kind):
  folder, unet = saved(kind)
  module, params, config = sd_unet.load_unet(folder)
  assert config['_class_name'] == 'UNet2DConditionModel'
  (args, kwargs), _ = _inputs(kind)
  ref = _reference(unet, kind)
  assert np.abs(ref).max() > 0.1
  assert _relative_error(module.apply({'params': params}, *args, **kwargs), ref) < 1e-4


@pytest.mark.parametrize('kind', ['sdxl', 'lcm'])
def test_export_loads_in_diffusers(saved, tmp_path, kind):
  """export_unet writes every tensor under diffusers' name (linear_1 / linear_2, cond_proj, class_embedding included)."""
  folder, unet = saved(kind)
  _, params, config = sd_unet.load_unet(folder)
  sd_unet.export_unet(tmp_path, config, params)
  loaded = diffusers.UNet2DConditionModel.from_pretrained(str(tmp_path)).eval()
  original, exported = unet.state_dict(), loaded.state_dict()
  assert sorted(original) == sorted(exported)
  for key, value in original.items():
    np.testing.assert_array_equal(exported[key].numpy(), value.numpy(), err_msg=key)
  np.testing.assert_array_equal(_reference(loaded, kind), _reference(unet, kind))


def test_sharded_and_fp16_folders_load(saved, tmp_path):
  folder, unet = saved('sd2')
  _, params, _ = sd_unet.load_unet(folder)
  flat = lambda tree: {k: np.asarray(v) for k, v in _flatten(tree).items()}
  unet.save_pretrained(str(tmp_path / 'sharded'), max_shard_size='200KB')
  assert (tmp_path / 'sharded' / 'diffusion_pytorch_model.safetensors.index.json').exists()
  sharded = flat(sd_unet.load_unet(tmp_path / 'sharded')[1])
  for key, value in flat(params).items():
    np.testing.assert_array_equal(sharded[key], value, err_msg=key)
  unet.save_pretrained(str(tmp_path / 'fp16'), variant='fp16')
  half = flat(sd_unet.load_unet(tmp_path / 'fp16')[1])
  for key, value in flat(params).items():
    assert half[key].dtype == np.float32
    np.testing.assert_allclose(half[key], value, rtol=1e-3, atol=1e-4, err_msg=key)


def _flatten(tree):
  import flax  # pylint: disable=g-import-not-at-top
  return flax.traverse_util.flatten_dict(tree, sep='/')


def test_bfloat16_compute(saved):
  """dtype=bfloat16 (float32 parameters) stays near the float32 output and returns float32."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  folder, _ = saved('sd2')
  module, params, _ = sd_unet.load_unet(folder)
  (args, kwargs), _ = _inputs('sd2')
  full = np.asarray(module.apply({'params': params}, *args, **kwargs))
  half = module.clone(dtype=jnp.bfloat16).apply({'params': params}, *args, **kwargs)
  assert half.dtype == jnp.float32 and _relative_error(half, full) < 5e-2


def test_remat_keeps_the_gradient():
  """remat=True (each resnet and transformer rematerialised) changes neither the parameters nor the gradient; on one
  cross-attention down block, to keep the backward pass's compile short."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  settings = dict(features=16, groups=4, eps=1e-5, heads=2, use_linear_projection=True, upcast=False, kernel='xla',
                  skip_time_act=False, dtype=jnp.float32, num_layers=1, transformer_layers=(1,))
  rng = np.random.default_rng(0)
  x, emb, text = (rng.standard_normal(s).astype(np.float32) for s in ((2, 4, 4, 8), (2, 12), (2, 3, 6)))
  plain, remat = sd_unet.DownBlock(**settings, remat=False), sd_unet.DownBlock(**settings, remat=True)
  params = plain.init(jax.random.PRNGKey(0), x, emb, text)['params']
  assert jax.tree.structure(remat.init(jax.random.PRNGKey(0), x, emb, text)['params']) == jax.tree.structure(params)
  grad = lambda m: _flatten(jax.grad(lambda p: jnp.mean(m.apply({'params': p}, x, emb, text)[0] ** 2))(params))
  expected = grad(plain)
  for key, value in grad(remat).items():
    np.testing.assert_allclose(value, expected[key], rtol=1e-5, atol=1e-8, err_msg=key)


def test_odd_sides_match_diffusers(saved):
  """A side the down path does not halve evenly: the upsamplers resize to the skips' size, as diffusers does."""
  folder, unet = saved('sd1')
  module, params, _ = sd_unet.load_unet(folder)
  (args, kwargs), (torch_args, _) = _inputs('sd1')
  x = args[0][:, :9, :11]
  with torch.no_grad():
    ref = unet(torch.tensor(x.transpose(0, 3, 1, 2)), *torch_args[1:]).sample.numpy().transpose(0, 2, 3, 1)
  assert _relative_error(module.apply({'params': params}, x, *args[1:], **kwargs), ref) < 1e-4


def test_refuses_other_models_and_blocks(saved, tmp_path):
  folder, _ = saved('sd1')
  config = json.loads((folder / 'config.json').read_text())
  with pytest.raises(ValueError, match='UNet2DModel'):
    sd_unet.module_from_config(dict(config, _class_name='UNet2DModel'), 'here')
  with pytest.raises(ValueError, match='SimpleCrossAttnDownBlock2D'):
    sd_unet.module_from_config(dict(config, down_block_types=['SimpleCrossAttnDownBlock2D', 'DownBlock2D']), 'here')
  with pytest.raises(ValueError, match='resnet_time_scale_shift'):
    sd_unet.module_from_config(dict(config, resnet_time_scale_shift='scale_shift'), 'here')
  (tmp_path / 'config.json').write_text(json.dumps(dict(config, _class_name='UNet2DModel')))
  with pytest.raises(ValueError, match='UNet2DModel'):
    sd_unet.load_unet(tmp_path)


def test_refuses_wrong_shapes_and_truncated_files(saved, tmp_path):
  from safetensors import numpy as safetensors_numpy  # pylint: disable=g-import-not-at-top
  folder, _ = saved('sd1')
  (tmp_path / 'config.json').write_text((folder / 'config.json').read_text())
  weights = folder / 'diffusion_pytorch_model.safetensors'
  state_dict = safetensors_numpy.load_file(str(weights))
  key = 'down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight'
  state_dict[key] = state_dict[key][:, :-1]
  safetensors_numpy.save_file(state_dict, str(tmp_path / 'diffusion_pytorch_model.safetensors'))
  with pytest.raises(ValueError, match=r'attn2\.to_k\.weight has shape \(32, 31\).*needs \(32, 32\)'):
    sd_unet.load_unet(tmp_path)
  data = weights.read_bytes()
  (tmp_path / 'diffusion_pytorch_model.safetensors').write_bytes(data[:len(data) // 2])
  with pytest.raises(ValueError, match='not a readable safetensors file'):
    sd_unet.load_unet(tmp_path)
