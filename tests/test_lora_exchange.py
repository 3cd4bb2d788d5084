"""LoRA exchange with diffusers (cm_jax.formats.lora): cm_jax's adapters exported load with diffusers'
load_lora_weights, and a LoRA made by peft on the diffusers UNet loads into cm_jax, each with the same UNet output.

rank 2, alpha 6: a file read or written with scale 1 (alpha lost) or alpha instead of alpha / r fails every test.
"""

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cm_jax import latents
from cm_jax.formats import lora as lora_format
from cm_jax.models import lora
import sd_fixtures

RANK, ALPHA = 2, 6.0
# LCM-LoRA's targets (diffusers' train_lcm_distill_lora_sd_wds.py): attention, feed-forward, projections, ResNets.
PEFT_TARGETS = ['to_q', 'to_k', 'to_v', 'to_out.0', 'proj_in', 'proj_out', 'ff.net.0.proj', 'ff.net.2', 'conv1',
                'conv2', 'conv_shortcut', 'downsamplers.0.conv', 'upsamplers.0.conv', 'time_emb_proj']
RULES = (r'attn\d/to_(q|k|v|out_0)/kernel$', r'ff/net_(0/proj|2)/kernel$', r'proj_(in|out)/kernel$',
         r'resnets_\d+/(conv1|conv2|conv_shortcut|time_emb_proj)/kernel$', r'(down|up)samplers_0/conv/kernel$')


def _inputs():
  """(NCHW latents, timesteps, prompt embeddings) for the tiny SD 1.x / 2.x pipelines (cross_attention_dim 32)."""
  rng = np.random.default_rng(5)
  return (rng.standard_normal((2, 4, 8, 8)).astype(np.float32), np.array([11, 650]),
          rng.standard_normal((2, 7, 32)).astype(np.float32))


def _torch_unet(unet, inputs, **kwargs):
  import torch  # pylint: disable=g-import-not-at-top
  x, t, hidden = inputs
  with torch.no_grad():
    return unet(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(hidden), **kwargs).sample.numpy()


def _jax_unet(module, params, inputs):
  x, t, hidden = inputs
  return np.asarray(module.apply({'params': params}, x.transpose(0, 2, 3, 1), t, hidden)).transpose(0, 3, 1, 2)


def _rel(got, want):
  return float(np.abs(got - want).max() / np.abs(want).max())


@pytest.fixture(scope='module')
def pipelines(tmp_path_factory):
  """family -> (folder, cm_jax's pipeline) of a tiny pipeline written once per family."""
  pytest.importorskip('torch')
  pytest.importorskip('diffusers')
  pytest.importorskip('peft')
  cache = {}

  def get(family):
    if family not in cache:
      folder = sd_fixtures.write_pipeline(tmp_path_factory.mktemp(family), family)
      cache[family] = folder, latents.load_diffusers_pipeline(folder)
    return cache[family]
  return get


@pytest.fixture
def sd15(pipelines):
  return pipelines('sd15')


def _random_adapters(params):
  """rank-2 adapters on RULES' kernels with A and B both random (B = 0 would hide any scale)."""
  adapters = lora.init(jax.random.PRNGKey(0), params, lora.select(params, RULES), RANK)
  leaves, treedef = jax.tree.flatten(adapters)
  keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
  return treedef.unflatten([0.5 * jax.random.normal(k, a.shape) / np.sqrt(a.shape[0]) for a, k in zip(leaves, keys)])


@pytest.mark.parametrize('family', ['sd15', 'sd21'])  # proj_in / proj_out: 1x1 convs, linear layers
def test_exported_lora_loads_in_diffusers_with_the_merged_output(pipelines, tmp_path, family):
  """cm_jax adapters (alpha / r = 3) written by write_lora, read by pipe.load_lora_weights: diffusers' UNet output
  equals cm_jax's merged UNet and its un-merged LoRA form; read back, the file gives the same adapters and scale."""
  import diffusers  # pylint: disable=g-import-not-at-top
  folder, ours = pipelines(family)
  adapters = _random_adapters(ours.unet_params)
  written = lora_format.write_lora(tmp_path / 'lora', adapters, ALPHA / RANK)
  assert written.name == 'pytorch_lora_weights.safetensors'
  pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder)
  inputs = _inputs()
  base = _torch_unet(pipe.unet, inputs)
  pipe.load_lora_weights(str(tmp_path / 'lora'))
  want = _torch_unet(pipe.unet, inputs)
  adapted = sorted(name for name, m in pipe.unet.named_modules() if hasattr(m, 'lora_A'))
  assert adapted == sorted(lora_format.module_name(p) for p in lora.select(ours.unet_params, RULES))
  merged = lora.merge(ours.unet_params, (adapters, ALPHA / RANK))
  got = _jax_unet(ours.unet_module, merged, inputs)
  print(f'export parity ({family}): max |cm_jax - diffusers| / max |diffusers| = {_rel(got, want):.2e}; '
        f'the LoRA moves the output by {_rel(base, want):.2e}')
  assert _rel(base, want) > 0.05  # the adapters change the output: a lost or wrong scale cannot pass
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
  x, t, hidden = inputs
  unmerged = lora.apply_unmerged(ours.unet_module, lora.LoRAParams(ours.unet_params, adapters, ALPHA / RANK),
                                 x.transpose(0, 2, 3, 1), t, hidden)
  np.testing.assert_allclose(np.asarray(unmerged).transpose(0, 3, 1, 2), want, rtol=1e-4,
                             atol=1e-4 * np.abs(want).max())

  back, scale = lora_format.read_lora(written, ours.unet_params)
  assert scale == pytest.approx(ALPHA / RANK)
  flat, flat_back = (flax.traverse_util.flatten_dict(t, sep='/') for t in (adapters, back))
  assert set(flat) == set(flat_back)
  for path, value in flat.items():
    np.testing.assert_allclose(flat_back[path], np.asarray(value), rtol=1e-6, err_msg=path)


def _peft_lora(unet, folder, metadata: bool):
  """A rank-2 alpha-6 peft LoRA (random A and B) on the diffusers `unet`, saved as diffusers' training scripts do."""
  import diffusers  # pylint: disable=g-import-not-at-top
  import peft  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  torch.manual_seed(3)
  unet.add_adapter(peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=PEFT_TARGETS, init_lora_weights=False))
  extra = dict(unet_lora_adapter_metadata=unet.peft_config['default'].to_dict()) if metadata else {}
  diffusers.StableDiffusionPipeline.save_lora_weights(
      str(folder), unet_lora_layers=peft.get_peft_model_state_dict(unet), **extra)
  return folder


@pytest.mark.parametrize('metadata', [True, False], ids=['alpha-in-metadata', 'no-metadata'])
def test_peft_lora_loads_into_cm_jax_with_the_diffusers_output(sd15, tmp_path, metadata):
  """A peft LoRA of the diffusers UNet, saved by save_lora_weights (with LoraConfig metadata: alpha / r = 3; without:
  diffusers reads alpha = r), merged by load_diffusers_pipeline(lora=..., lora_scale=0.7): the UNet output equals
  diffusers' after load_lora_weights with scale 0.7."""
  import diffusers  # pylint: disable=g-import-not-at-top
  folder, _ = sd15
  source = diffusers.StableDiffusionPipeline.from_pretrained(folder)
  lora_dir = _peft_lora(source.unet, tmp_path / 'style', metadata)
  pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder)
  inputs = _inputs()
  base = _torch_unet(pipe.unet, inputs)
  pipe.load_lora_weights(str(lora_dir))
  want = _torch_unet(pipe.unet, inputs, cross_attention_kwargs={'scale': 0.7})
  ours = latents.load_diffusers_pipeline(folder, lora=lora_dir, lora_scale=0.7)
  got = _jax_unet(ours.unet_module, ours.unet_params, inputs)
  print(f'import parity (metadata={metadata}): max |cm_jax - diffusers| / max |diffusers| = {_rel(got, want):.2e}; '
        f'the LoRA moves the output by {_rel(base, want):.2e}')
  assert _rel(base, want) > 0.05
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
  _, scale = lora_format.read_lora(lora_dir / lora_format.LORA_WEIGHTS, ours.unet_params)
  assert scale == pytest.approx(ALPHA / RANK if metadata else 1.0)


def test_adapters_of_mixed_ranks_export_with_rank_and_alpha_patterns(sd15, tmp_path):
  """Rank 2 on most kernels, rank 3 on the to_k ones (one scale 3: alpha 6 and 9): peft's rank_pattern and
  alpha_pattern in the metadata make diffusers build and scale each layer as cm_jax merges it."""
  import diffusers  # pylint: disable=g-import-not-at-top
  folder, ours = sd15
  adapters = _random_adapters(ours.unet_params)
  wider = lora.init(jax.random.PRNGKey(4), ours.unet_params, lora.select(ours.unet_params, (r'to_k/kernel$',)), 3)
  wider = jax.tree.map(lambda a: a + 0.3, wider)
  adapters = flax.traverse_util.unflatten_dict({**flax.traverse_util.flatten_dict(adapters),
                                                **flax.traverse_util.flatten_dict(wider)})
  _, config = lora_format.to_peft(adapters, ALPHA / RANK)
  assert config['r'] == 2 and config['lora_alpha'] == ALPHA and set(config['rank_pattern'].values()) == {3}
  lora_format.write_lora(tmp_path / 'mixed', adapters, ALPHA / RANK)
  pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder)
  pipe.load_lora_weights(str(tmp_path / 'mixed'))
  inputs = _inputs()
  want = _torch_unet(pipe.unet, inputs)
  got = _jax_unet(ours.unet_module, lora.merge(ours.unet_params, (adapters, ALPHA / RANK)), inputs)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_an_exported_and_a_peft_lora_combine_as_in_diffusers(sd15, tmp_path):
  """LCM-LoRA's acceleration vector plus a style LoRA: merge(W, (cm_jax adapters, 3), (peft style, 0.7 x 3)) equals
  diffusers with both loaded and set_adapters(weights [1, 0.7])."""
  import diffusers  # pylint: disable=g-import-not-at-top
  folder, ours = sd15
  accel = _random_adapters(ours.unet_params)
  lora_format.write_lora(tmp_path / 'accel', accel, ALPHA / RANK)
  style_dir = _peft_lora(diffusers.StableDiffusionPipeline.from_pretrained(folder).unet, tmp_path / 'style', True)
  pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder)
  pipe.load_lora_weights(str(tmp_path / 'accel'), adapter_name='accel')
  pipe.load_lora_weights(str(style_dir), adapter_name='style')
  pipe.set_adapters(['accel', 'style'], adapter_weights=[1.0, 0.7])
  inputs = _inputs()
  want = _torch_unet(pipe.unet, inputs)
  style, style_scale = lora_format.read_lora(style_dir, ours.unet_params)
  merged = lora.merge(ours.unet_params, (accel, ALPHA / RANK), (style, 0.7 * style_scale))
  got = _jax_unet(ours.unet_module, merged, inputs)
  print(f'combined parity: max |cm_jax - diffusers| / max |diffusers| = {_rel(got, want):.2e}')
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def _peft_state_dict(params):
  """A small PEFT-format UNet LoRA state dict of random tensors (attention and one conv) for `params`' UNet."""
  rng = np.random.default_rng(0)
  flat = flax.traverse_util.flatten_dict(params, sep='/')
  out = {}
  for path in ('down_blocks_0/attentions_0/transformer_blocks_0/attn1/to_q/kernel',
               'down_blocks_0/resnets_0/conv1/kernel'):
    module, shape = lora_format.module_name(path), flat[path].shape
    lora_a = (RANK, shape[0]) if len(shape) == 2 else (RANK, shape[2], shape[0], shape[1])
    lora_b = (shape[-1], RANK) if len(shape) == 2 else (shape[-1], RANK, 1, 1)
    out[f'unet.{module}.lora_A.weight'] = rng.standard_normal(lora_a).astype(np.float32)
    out[f'unet.{module}.lora_B.weight'] = rng.standard_normal(lora_b).astype(np.float32)
  return out


def test_older_diffusers_and_kohya_keys_read_as_peft(sd15, tmp_path):
  """The same LoRA under the older diffusers keys (lora.down / lora.up, `.alpha`) and kohya's (lora_unet_..., alpha):
  the same adapters as its PEFT keys with metadata lora_alpha = 6."""
  from safetensors import numpy as safetensors_numpy  # pylint: disable=g-import-not-at-top
  _, ours = sd15
  peft_keys = _peft_state_dict(ours.unet_params)
  want, want_scale = lora_format.from_peft(peft_keys, ours.unet_params, 'peft', metadata={'unet.lora_alpha': ALPHA})
  modules = sorted({k.removeprefix('unet.').split('.lora_')[0] for k in peft_keys})
  old = {k.replace('.lora_A.', '.lora.down.').replace('.lora_B.', '.lora.up.'): v for k, v in peft_keys.items()}
  old.update({f'unet.{m}.alpha': np.array(ALPHA, np.float32) for m in modules})
  kohya = {}
  for key, value in peft_keys.items():
    module, role = key.removeprefix('unet.').split('.lora_')
    kohya[f'lora_unet_{module.replace(".", "_")}.lora_{"down" if role.startswith("A") else "up"}.weight'] = value
  kohya.update({f'lora_unet_{m.replace(".", "_")}.alpha': np.array(ALPHA, np.float32) for m in modules})
  for name, state_dict in (('old', old), ('kohya', kohya)):
    safetensors_numpy.save_file(state_dict, str(tmp_path / f'{name}.safetensors'))
    got, scale = lora_format.read_lora(tmp_path / f'{name}.safetensors', ours.unet_params)
    assert scale == pytest.approx(want_scale) and want_scale == pytest.approx(ALPHA / RANK)
    flat_got, flat_want = (flax.traverse_util.flatten_dict(t, sep='/') for t in (got, want))
    assert set(flat_got) == set(flat_want), name
    for path, value in flat_want.items():
      np.testing.assert_allclose(flat_got[path], value, rtol=1e-6, err_msg=f'{name}: {path}')


def test_a_key_of_a_module_the_unet_lacks_is_named(sd15, tmp_path):
  from safetensors import numpy as safetensors_numpy  # pylint: disable=g-import-not-at-top
  folder, ours = sd15
  state_dict = _peft_state_dict(ours.unet_params)
  bad = 'unet.down_blocks.3.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight'  # SD 1.5's 4th level
  state_dict[bad] = np.zeros((RANK, 32), np.float32)
  state_dict[bad.replace('lora_A', 'lora_B')] = np.zeros((32, RANK), np.float32)
  safetensors_numpy.save_file(state_dict, str(tmp_path / 'other.safetensors'))
  with pytest.raises(ValueError, match=bad.replace('.', r'\.')):
    latents.load_diffusers_pipeline(folder, lora=tmp_path / 'other.safetensors')
  with pytest.raises(ValueError, match='lora_unet_input_blocks_1_1_proj_in.lora_down.weight'):  # kohya's SGM names
    lora_format.from_peft({'lora_unet_input_blocks_1_1_proj_in.lora_down.weight': np.zeros((RANK, 32, 1, 1))},
                          ours.unet_params, 'sgm')


def test_a_lora_of_other_widths_and_half_pairs_are_refused(sd15):
  _, ours = sd15
  state_dict = _peft_state_dict(ours.unet_params)
  key = next(k for k in state_dict if k.endswith('to_q.lora_A.weight'))
  wide = dict(state_dict, **{key: np.zeros((RANK, 320), np.float32)})
  with pytest.raises(ValueError, match='do not fit the kernel'):
    lora_format.from_peft(wide, ours.unet_params, 'wide')
  half = {k: v for k, v in state_dict.items() if k != key}
  with pytest.raises(ValueError, match='no down matrix'):
    lora_format.from_peft(half, ours.unet_params, 'half')
  with pytest.raises(ValueError, match='text-encoder LoRA'):
    lora_format.from_peft(dict(state_dict, **{'text_encoder.x.lora_A.weight': np.zeros((2, 2))}), ours.unet_params,
                          'te')


class _Conv(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Conv(5, (3, 3), padding='SAME', name='conv')(x)


@pytest.mark.parametrize('model, shape', [(nn.Dense(5), (3, 4)), (nn.Conv(5, (3, 3), strides=2), (2, 6, 6, 4)),
                                          (_Conv(), (2, 6, 6, 4))], ids=['top-level-dense', 'top-level-conv', 'conv'])
def test_apply_unmerged_adapts_a_top_level_layer(model, shape):
  """A layer whose module path is empty (the model itself) has the kernel path 'kernel': its branch is added."""
  x = jax.random.normal(jax.random.PRNGKey(0), shape)
  params = model.init(jax.random.PRNGKey(1), x)['params']
  paths = lora.select(params, ('kernel$',))
  adapters = lora.init(jax.random.PRNGKey(2), params, paths, RANK)
  adapters = jax.tree.map(lambda v: v + 0.5, adapters)  # B != 0
  got = lora.apply_unmerged(model, lora.LoRAParams(params, adapters, ALPHA / RANK), x)
  want = model.apply({'params': lora.merge(params, (adapters, ALPHA / RANK))}, x)
  assert float(jnp.abs(want - model.apply({'params': params}, x)).max()) > 0.1
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
