"""Paper networks (DDPM++/NCSN++, ADM) and paper configs: abstract train states, parameter counts, block options."""

import functools
import importlib
import re
import types

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cm_jax import objectives
from cm_jax.models import blocks
from cm_jax.models import build_model
from cm_jax.state import create_state, make_optimizer

# Parameter counts (BUILD_NOTES.md, "Paper networks and configs"), against the papers' 55.73M (EDM's DDPM++,
# ECT's 55.7M), ~56M (CM and iCT's NCSN++) and 295.9M (EDM's ADM for ImageNet-64).
NCSNPP, NCSNPP_DEEP, DDPMPP, ADM = 56_395_523, 97_610_499, 55_732_739, 295_899_267
MEANFLOW_UNET = 55_929_347  # the port's SongUNet: t and t - r through one sinusoid map, concatenated (configs/cifar10_meanflow.py)
# The published count and the relative tolerance each built network must meet (iCT's deep NCSN++ has none).
PAPER_COUNTS = {DDPMPP: (55.73e6, 1e-4), NCSNPP: (56e6, 0.02), ADM: (295.9e6, 2e-4)}
PAPER_CONFIGS = {
    'cifar10_edm': NCSNPP, 'cifar10_edm:ddpmpp': DDPMPP, 'cifar10_cd_lpips': NCSNPP, 'cifar10_cd_l2': NCSNPP,
    'cifar10_ct_lpips': NCSNPP, 'cifar10_ict': NCSNPP, 'cifar10_ict_deep': NCSNPP_DEEP, 'cifar10_ect': DDPMPP,
    'imagenet64_edm': ADM, 'imagenet64_cd_lpips': ADM, 'imagenet64_ct_lpips': ADM, 'imagenet64_ict': ADM,
    'imagenet64_ect': ADM, 'cifar10_meanflow': MEANFLOW_UNET,
}
# Configs with an EMA target theta- (mu > 0); CD with mu = 0, iCT and ECT use sg(theta) and keep no copy.
KEEPS_TARGET = {'cifar10_ct_lpips', 'imagenet64_cd_lpips', 'imagenet64_ct_lpips'}
IMAGE_SHAPES = {'cifar10': (32, 32, 3), 'imagenet_resized/64x64': (64, 64, 3)}


def _config(name):
  module, _, arg = name.partition(':')
  get_config = importlib.import_module(f'configs.{module}').get_config
  return get_config(arg) if arg else get_config()


# Dropout rates and the compute dtype do not change parameter shapes (see the bfloat16 test below), so configs
# sharing a network trace its initialisation once: each trace of a 56M-300M network costs seconds on 2 cores.
_SHAPE_FREE_FIELDS = ('dropout', 'label_dropout', 'dtype')


@functools.lru_cache(maxsize=None)
def _abstract_params(network, image_shape):
  """Abstract parameters of the network given as sorted (field, value) pairs."""
  model = build_model(dict(network))
  cond = jnp.zeros((1,), jnp.int32) if dict(network)['num_classes'] else None
  return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1,) + image_shape), jnp.zeros((1,)), cond)


def _abstract_state(config):
  """The full train state (params, extra, optimiser state, EMAs, target) as shapes, with nothing allocated."""
  model = build_model(config.model)
  network = tuple(sorted((k, v) for k, v in config.model.items() if k not in _SHAPE_FREE_FIELDS))
  variables = _abstract_params(network, IMAGE_SHAPES[config.data.name])
  traced_model = types.SimpleNamespace(init=lambda *args: jax.tree.map(lambda v: jnp.zeros(v.shape, v.dtype),
                                                                       variables))
  init = functools.partial(
      create_state, model=traced_model, objective=objectives.make_objective(config, model),
      tx=make_optimizer(config.optim), num_ema=len(config.ema.rates), sample_input=(None, None, None))
  return jax.eval_shape(init, jax.random.key(0))


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize('name', sorted(PAPER_CONFIGS))
def test_paper_config_builds_abstract_train_state(name):
  config = _config(name)
  state = _abstract_state(config)
  count = _count(state.params)
  print(f'{name}: {config.model.name} {count:,} parameters')
  assert count == PAPER_CONFIGS[name]  # pins the count; the paper's is checked next
  if PAPER_CONFIGS[name] in PAPER_COUNTS:
    paper, tolerance = PAPER_COUNTS[PAPER_CONFIGS[name]]
    assert abs(count / paper - 1) < tolerance
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params))
  assert len(state.ema) == len(config.ema.rates) and _count(state.ema) == count * len(state.ema)
  assert (state.target is not None) == (name in KEEPS_TARGET)
  assert 0 <= _count(state.opt_state) - 2 * count < 100  # Adam / RAdam moments for every parameter, a few counters


def test_paper_configs_carry_their_published_fid_in_the_docstring():
  for name in {n.partition(':')[0] for n in PAPER_CONFIGS}:
    doc = importlib.import_module(f'configs.{name}').__doc__
    assert 'Command' in doc and 'Hardware' in doc and 'Batch' in doc and 'FID' in doc, name


# ---------------------------------------------------------------------------------------------------------
# Small networks with every component: two levels, attention at 4x4, resampling, label conditioning (ADM).
TINY = dict(channels=8, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.0)
TINY_DDPMPP = dict(TINY, name='ncsnpp')
TINY_NCSNPP = dict(TINY, name='ncsnpp', time_embedding='fourier', time_scale=16.0, noise_mult=2,
                   residual_input=True, resample_filter=(1, 3, 3, 1))
TINY_ADM = dict(TINY, name='adm', head_dim=4, num_classes=5, label_dropout=0.0)


def _inputs(num_classes, batch=2, size=8, seed=0):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal((batch, size, size, 3)), jnp.float32)
  c_noise = jnp.asarray(rng.uniform(-1, 1, batch), jnp.float32)
  cond = jnp.asarray(rng.integers(0, num_classes, batch), jnp.int32) if num_classes else None
  return x, c_noise, cond


def _params(config, seed=0):
  """Random parameters drawn in numpy from the abstract shapes (no init compile): kernels N(0, 1/fan_in),
  norm scales 1 + N(0, 0.1^2), biases N(0, 0.1^2), so that zero-initialised layers do not hide anything."""
  model = build_model(config)
  shapes = jax.eval_shape(model.init, jax.random.key(0), *_inputs(config.get('num_classes', 0)))['params']
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    noise = rng.standard_normal(leaf.shape).astype(np.float32)
    name = path[-1].key
    if name == 'scale':
      return 1.0 + 0.1 * noise
    return 0.1 * noise if name == 'bias' else noise / np.sqrt(np.prod(leaf.shape[:-1]))

  return model, jax.tree_util.tree_map_with_path(draw, shapes)


def _paths(config, size=8):
  model = build_model(config)
  shapes = jax.eval_shape(model.init, jax.random.key(0), *_inputs(config.get('num_classes', 0), size=size))
  return set(flax.traverse_util.flatten_dict(shapes['params'], sep='/'))


def test_parameter_paths_are_regular():
  paths = _paths(dict(name='ncsnpp'), size=32)  # the full CIFAR-10 DDPM++, as shapes
  for expected in ('enc_32x32/conv/kernel', 'enc_16x16/down/conv_0/kernel', 'enc_16x16/down/skip/kernel',
                   'enc_16x16/block_0/conv_0/kernel', 'enc_16x16/block_3/qkv/kernel', 'dec_8x8/in_0/qkv/kernel',
                   'dec_16x16/up/affine/kernel', 'dec_16x16/block_4/proj/kernel', 'embed/dense_1/kernel',
                   'out_conv/kernel'):
    assert expected in paths, expected
  pattern = re.compile(r'^((enc|dec)_\d+x\d+/(conv|aux_residual|((down|up|in_\d|block_\d)/\w+))|embed/\w+'
                       r'|out_norm|out_conv)/(kernel|bias|scale)$')
  assert all(pattern.match(p) for p in paths), sorted(p for p in paths if not pattern.match(p))


def test_attention_placement():
  """DDPM++: every encoder block at 16x16 and the last decoder block; ADM: every block at its resolutions."""
  attn = lambda paths, prefix: sorted(p.split('/')[1] for p in paths if p.startswith(prefix) and '/qkv/kernel' in p)
  ddpmpp = _paths(dict(name='ncsnpp'), size=32)
  assert attn(ddpmpp, 'enc_16x16') == [f'block_{i}' for i in range(4)]
  assert attn(ddpmpp, 'dec_16x16') == ['block_4'] and attn(ddpmpp, 'enc_32x32') == []
  assert attn(ddpmpp, 'dec_8x8') == ['in_0']
  adm = _paths(dict(TINY_ADM, attn_resolutions=(8,)))
  assert attn(adm, 'dec_8x8') == ['block_0', 'block_1'] and attn(adm, 'enc_8x8') == ['block_0']
  assert attn(adm, 'dec_4x4') == ['in_0']
  assert 'enc_4x4/aux_residual/kernel' in _paths(TINY_NCSNPP)


@pytest.mark.parametrize('config', [TINY_NCSNPP, TINY_ADM], ids=['ncsnpp', 'adm'])
def test_bfloat16_compute_keeps_float32_params_and_output(config):
  model, params = _params(config)
  inputs = _inputs(config.get('num_classes', 0))
  out32 = jax.jit(model.apply)({'params': params}, *inputs)
  out16 = jax.jit(build_model(dict(config, dtype='bfloat16')).apply)({'params': params}, *inputs)
  assert out32.shape == inputs[0].shape and out16.dtype == jnp.float32
  assert not np.array_equal(out16, out32)  # really computed in bfloat16
  np.testing.assert_allclose(out16, out32, rtol=0, atol=0.05 * float(jnp.max(jnp.abs(out32))))


def test_label_dropout_gives_the_unconditional_branch():
  config = dict(TINY_ADM, label_dropout=1.0)
  model, params = _params(config)
  x, c_noise, cond = _inputs(5)
  jitted = jax.jit(model.apply, static_argnames='train')
  apply = lambda c, train: jitted({'params': params}, x, c_noise, c, train=train, rngs={'dropout': jax.random.key(1)})
  uncond = apply(jnp.full_like(cond, -1), False)
  np.testing.assert_allclose(apply(cond, True), uncond, atol=1e-6)  # every label dropped in training
  assert not np.allclose(apply(cond, False), uncond, atol=1e-4)  # labels used at evaluation


def test_double_norm_is_invariant_to_the_scale_of_the_modulation():
  """y = GN(x) pnorm(s(t)) + pnorm(b(t)): scaling the affine layers by c > 0 changes nothing ('double' only)."""
  x, c_noise, _ = _inputs(0)
  for mode, invariant in (('double', True), ('scale_shift', False)):
    model, params = _params(dict(TINY_DDPMPP, adaptive_norm=mode))
    flat = flax.traverse_util.flatten_dict(params, sep='/')
    scaled = flax.traverse_util.unflatten_dict(
        {k: 3.0 * v if '/affine/' in k else v for k, v in flat.items()}, sep='/')
    apply = jax.jit(model.apply)
    out, out_scaled = (apply({'params': p}, x, c_noise) for p in (params, scaled))
    assert np.allclose(out, out_scaled, atol=1e-4) == invariant, mode


def test_resampling_filters():
  x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 4, 4, 2)), jnp.float32)
  up = blocks.resample(x, 'up', (1, 1))
  np.testing.assert_allclose(up, jnp.repeat(jnp.repeat(x, 2, 1), 2, 2), atol=1e-6)  # nearest neighbour
  np.testing.assert_allclose(blocks.resample(up, 'down', (1, 1)), x, atol=1e-6)  # 2x2 average
  ones = jnp.ones((1, 8, 8, 1))
  np.testing.assert_allclose(blocks.resample(ones, 'down', (1, 3, 3, 1))[0, 1:-1, 1:-1], 1.0, atol=1e-6)
  np.testing.assert_allclose(blocks.resample(ones, 'up', (1, 3, 3, 1))[0, 1:-1, 1:-1], 1.0, atol=1e-6)
