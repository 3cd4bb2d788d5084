"""Tests for cm_jax.models: shapes, conditioning, dropout, init, naming, JVP."""

import re

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cm_jax.models import build_model

# Small enough to compile quickly on CPU, but with every UNet component:
# two levels, attention at 4x4, channel changes (1x1 skips), up/downsampling.
TINY_UNET = dict(name='unet', channels=8, channel_mult=(1, 2),
                 num_res_blocks=1, attn_resolutions=(4,), dropout=0.1,
                 num_classes=10, time_embedding='positional', time_scale=100.0)
DIGITS_UNET = dict(name='unet', channels=32, channel_mult=(1, 2),
                   num_res_blocks=2, attn_resolutions=(4,))
TOY_MLP = dict(name='mlp', hidden=32, depth=2, dropout=0.1, num_classes=3,
               time_embedding='fourier', time_scale=16.0)


def _inputs(shape, num_classes, seed=0):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
  c_noise = jnp.asarray(rng.uniform(-1, 1, shape[0]), jnp.float32)
  cond = (jnp.asarray(rng.integers(0, num_classes, shape[0]), jnp.int32)
          if num_classes else None)
  return x, c_noise, cond


def _perturbed(params, seed=0, std=0.1):
  """Adds N(0, std^2) noise to every parameter (numpy: no XLA compiles)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda p: p + std * rng.standard_normal(p.shape).astype(p.dtype), params)


def _param_count(config, shape):
  model = build_model(config)
  x, c_noise, cond = _inputs(shape, config.get('num_classes', 0))
  shapes = jax.eval_shape(model.init, {'params': jax.random.key(0)}, x,
                          c_noise, cond)
  return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(shapes))


def _initialise(config, shape):
  """(model, params, (x, c_noise, cond), jitted apply) for a config."""
  model = build_model(config)
  inputs = _inputs(shape, config['num_classes'])
  params = jax.jit(model.init)({'params': jax.random.key(0)}, *inputs)['params']
  return model, params, inputs, jax.jit(model.apply, static_argnames='train')


@pytest.fixture(scope='module')
def unet():
  return _initialise(TINY_UNET, (2, 8, 8, 1))


@pytest.fixture(scope='module')
def mlp():
  return _initialise(TOY_MLP, (4, 2))


@pytest.fixture(params=['unet', 'mlp'])
def initialised(request):
  return request.getfixturevalue(request.param)


@pytest.mark.parametrize('config, shape', [
    (TINY_UNET, (2, 8, 8, 1)),
    (dict(TINY_UNET, num_classes=0), (2, 8, 8, 1)),
    (dict(TINY_UNET, channel_mult=(1, 2, 2), attn_resolutions=(16,),
          time_embedding='fourier'), (2, 32, 32, 3)),
    (TOY_MLP, (5, 2)),
    (dict(TOY_MLP, num_classes=0), (5, 7)),
])
def test_output_has_input_shape(config, shape):
  model = build_model(config)
  x, c_noise, cond = _inputs(shape, config['num_classes'])
  variables = jax.eval_shape(model.init, {'params': jax.random.key(0)}, x,
                             c_noise, cond)
  out = jax.eval_shape(
      lambda v: model.apply(v, x, c_noise, cond, train=True,
                            rngs={'dropout': jax.random.key(1)}), variables)
  assert out.shape == x.shape and out.dtype == x.dtype


def test_initial_output_is_exactly_zero(initialised):
  _, params, inputs, apply = initialised
  out = apply({'params': params}, *inputs)
  np.testing.assert_array_equal(out, 0.0)


def test_dropout_only_in_train_mode(initialised):
  _, params, inputs, apply = initialised
  variables = {'params': _perturbed(params)}

  def run(train, seed):
    return apply(variables, *inputs, train=train,
                 rngs={'dropout': jax.random.key(seed)})

  np.testing.assert_array_equal(run(False, 0), run(False, 1))
  np.testing.assert_array_equal(run(False, 0), apply(variables, *inputs))
  assert not np.allclose(run(True, 0), run(True, 1))


def test_output_depends_on_noise_level_and_label(initialised):
  model, params, (x, c_noise, cond), apply = initialised
  variables = {'params': _perturbed(params)}
  out = apply(variables, x, c_noise, cond)
  other_noise = apply(variables, x, c_noise + 0.5, cond)
  other_label = apply(variables, x, c_noise, (cond + 1) % model.num_classes)
  for changed in (other_noise, other_label):
    assert np.all(np.abs(changed - out).reshape(len(x), -1).max(1) > 1e-4)


def test_missing_or_unexpected_label_raises():
  x, c_noise, cond = _inputs((2, 2), 3)
  init = lambda config, cond: jax.eval_shape(
      build_model(config).init, {'params': jax.random.key(0)}, x, c_noise, cond)
  with pytest.raises(ValueError, match='num_classes'):
    init(TOY_MLP, None)
  with pytest.raises(ValueError, match='num_classes'):
    init(dict(TOY_MLP, num_classes=0), cond)


def test_param_paths_are_regular():
  model = build_model(DIGITS_UNET)
  x, c_noise, _ = _inputs((1, 8, 8, 1), 0)
  params = jax.eval_shape(model.init, {'params': jax.random.key(0)}, x,
                          c_noise)['params']
  paths = set(flax.traverse_util.flatten_dict(params, sep='/'))
  for expected in ('conv_in/kernel', 'time_embed/dense_0/kernel',
                   'down_0/res_1/conv_0/kernel', 'down_0/downsample/kernel',
                   'down_1/attn_0/qkv/kernel', 'mid/attn/qkv/kernel',
                   'mid/res_1/film/kernel', 'up_1/res_2/skip/kernel',
                   'up_1/upsample/kernel', 'conv_out/kernel'):
    assert expected in paths
  pattern = re.compile(
      r'^(conv_in|conv_out|norm_out|time_embed/(dense_\d|label)'
      r'|(down|up)_\d/((res|attn)_\d/\w+|downsample|upsample)'
      r'|mid/(res_\d|attn)/\w+)/(kernel|bias|scale|embedding)$')
  assert all(pattern.match(p) for p in paths), sorted(
      p for p in paths if not pattern.match(p))


def test_digits_unet_parameter_count():
  count = _param_count(DIGITS_UNET, (1, 8, 8, 1))
  print(f'digits UNet (channels 32, mult (1, 2), 2 res blocks, attn at 4): '
        f'{count:,} parameters')
  assert 5e5 < count < 5e6


def test_unknown_model_name_raises():
  with pytest.raises(ValueError, match=r"'transformer'.*mlp.*unet"):
    build_model(dict(name='transformer'))


def test_unknown_field_raises():
  with pytest.raises(ValueError, match='chanels'):
    build_model(dict(DIGITS_UNET, chanels=64))
  with pytest.raises(ValueError, match='channels'):
    build_model(dict(TOY_MLP, channels=64))


def test_unknown_time_embedding_raises():
  model = build_model(dict(TOY_MLP, time_embedding='learned'))
  with pytest.raises(ValueError, match='learned'):
    model.init({'params': jax.random.key(0)}, *_inputs((2, 2), 3))


def test_jvp_matches_central_difference_in_float64(unet):
  model, params, (x, c_noise, cond), _ = unet
  with jax.enable_x64(True):
    params = jax.tree.map(lambda p: jnp.asarray(p, jnp.float64),
                          _perturbed(params))
    x, c_noise = jnp.asarray(x, jnp.float64), jnp.asarray(c_noise, jnp.float64)
    rng = np.random.default_rng(1)
    dx = jnp.asarray(rng.standard_normal(x.shape))
    dc = jnp.asarray(rng.standard_normal(c_noise.shape))

    f = jax.jit(lambda x, c: model.apply({'params': params}, x, c, cond))
    _, tangent = jax.jvp(f, (x, c_noise), (dx, dc))
    eps = 1e-6
    finite_diff = (f(x + eps * dx, c_noise + eps * dc) -
                   f(x - eps * dx, c_noise - eps * dc)) / (2 * eps)
    assert tangent.dtype == jnp.float64
    rel_err = jnp.linalg.norm(tangent - finite_diff) / jnp.linalg.norm(tangent)
    assert rel_err < 1e-6, rel_err
