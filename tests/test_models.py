"""Tests for cm_jax.models: shapes, conditioning, dropout, init, naming, JVP."""

import functools
import re

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cm_jax.models import build_model, init_from_teacher, layers

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
  for expected in ('enc_8x8/conv/kernel', 'embed/dense_0/kernel', 'enc_8x8/block_1/conv_0/kernel',
                   'enc_4x4/down/conv_0/kernel', 'enc_4x4/block_0/qkv/kernel', 'dec_4x4/in_0/qkv/kernel',
                   'dec_4x4/in_1/affine/kernel', 'dec_8x8/block_2/skip/kernel', 'dec_8x8/up/conv_1/kernel',
                   'out_conv/kernel'):
    assert expected in paths
  pattern = re.compile(
      r'^(out_conv|out_norm|embed/(dense_\d|label|guidance)|enc_\d+x\d+/(conv|(down|block_\d)/\w+)'
      r'|dec_\d+x\d+/(in_\d|up|block_\d)/\w+)/(kernel|bias|scale|embedding)$')
  assert all(pattern.match(p) for p in paths), sorted(
      p for p in paths if not pattern.match(p))


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
  model = model.clone(dtype='float64')  # compute in float64 (the output follows the compute dtype)
  with jax.enable_x64(True):
    params = jax.tree.map(lambda p: jnp.asarray(p, jnp.float64),
                          _perturbed(params))
    x, c_noise = jnp.asarray(x, jnp.float64), jnp.asarray(c_noise, jnp.float64)
    rng = np.random.default_rng(1)
    dx = jnp.asarray(rng.standard_normal(x.shape))
    dc = jnp.asarray(rng.standard_normal(c_noise.shape))

    f = jax.jit(lambda x, c: model.apply({'params': params}, x, c, cond))
    _, tangent = jax.jvp(f, (x, c_noise), (dx, dc))
    eps = 1e-4
    finite_diff = (f(x + eps * dx, c_noise + eps * dc) -
                   f(x - eps * dx, c_noise - eps * dc)) / (2 * eps)
    assert tangent.dtype == jnp.float64
    rel_err = jnp.linalg.norm(tangent - finite_diff) / jnp.linalg.norm(tangent)
    # jax.nn.dot_product_attention takes its softmax in float32 whatever the input dtype, which bounds the agreement
    # near 3e-4 (a tangent that misses a path through the network is off by O(1)).
    assert rel_err < 2e-3, rel_err


# ---------------------------------------------------------------------------------------------------------
# Labels, the guidance input and the adaptive norms, the same on every network.
# ---------------------------------------------------------------------------------------------------------
# One level on 4x4 images: the embeddings and norms under test are the same at every level, and compiles stay short.
_ONE_LEVEL = dict(channels=8, channel_mult=(1,), num_res_blocks=1, attn_resolutions=())
NETWORKS = {
    'mlp': (dict(name='mlp', hidden=32, depth=2), (4, 2)),
    'unet': (dict(_ONE_LEVEL, name='unet'), (2, 4, 4, 1)),
    'ncsnpp': (dict(_ONE_LEVEL, name='ncsnpp', dropout=0.0), (2, 4, 4, 1)),
    'adm': (dict(_ONE_LEVEL, name='adm', head_dim=4, num_classes=0, dropout=0.0), (2, 4, 4, 1)),
}


def _without(params, component):
  """params without the entries under a path component named `component` (e.g. 'label', 'guidance')."""
  flat = flax.traverse_util.flatten_dict(params)
  return flax.traverse_util.unflatten_dict({k: v for k, v in flat.items() if component not in k})


def _built(name, **fields):
  """(model, params, (x, c_noise, cond), jitted apply) for NETWORKS[name] with `fields` changed.

  The parameters are drawn in numpy from the abstract shapes (no init compile), every one of them non-zero:
  kernels N(0, 1/fan_in), norm scales 1 + N(0, 0.1^2), other vectors N(0, 0.1^2).
  """
  config, shape = NETWORKS[name]
  config = dict(config, **fields)
  model = build_model(config)
  inputs = _inputs(shape, config.get('num_classes', 0))
  shapes = jax.eval_shape(model.init, {'params': jax.random.key(0)}, *inputs)['params']
  rng = np.random.default_rng(0)

  def draw(path, leaf):
    noise = rng.standard_normal(leaf.shape).astype(np.float32)
    if len(leaf.shape) > 1:
      return noise / np.sqrt(np.prod(leaf.shape[:-1]))
    return (1.0 if path[-1].key == 'scale' else 0.0) + 0.1 * noise

  params = jax.tree_util.tree_map_with_path(draw, shapes)
  return model, params, inputs, jax.jit(model.apply, static_argnames='train')


@pytest.mark.parametrize('name', sorted(NETWORKS))
def test_guidance_input_changes_the_output_only_when_enabled(name):
  """A trained guidance input makes F depend on s; with it zeroed (its initial value) F is the network without the
  input, for every s; a network without the input rejects a guidance scale."""
  model, params, (x, c_noise, cond), apply = _built(name, guidance_embedding=True)
  scale = lambda s: jnp.full((len(x),), s)
  out_1, out_3 = (apply({'params': params}, x, c_noise, cond, guidance=scale(s)) for s in (1.0, 3.0))
  assert np.all(np.abs(out_3 - out_1).reshape(len(x), -1).max(1) > 1e-4)

  zeroed = jax.tree_util.tree_map_with_path(
      lambda path, p: jnp.zeros_like(p) if 'guidance' in jax.tree_util.keystr(path) else p, params)
  plain = build_model(dict(NETWORKS[name][0], guidance_embedding=False))
  reference = jax.jit(plain.apply)({'params': _without(params, 'guidance')}, x, c_noise, cond)
  for s in (0.0, 1.0, 5.0):
    np.testing.assert_allclose(apply({'params': zeroed}, x, c_noise, cond, guidance=scale(s)), reference,
                               rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match='model.guidance_embedding=False'):
    jax.eval_shape(plain.apply, {'params': _without(params, 'guidance')}, x, c_noise, cond, guidance=scale(2.0))


@pytest.mark.parametrize('name', sorted(NETWORKS))
def test_negative_label_is_the_unconditional_branch(name):
  """F(x, c, -1) of a class-conditional network is the unconditional network with the same other parameters;
  label_dropout = 1 drops every training label, so training-mode F is that branch, evaluation-mode F is not."""
  model, params, (x, c_noise, cond), apply = _built(name, num_classes=3, label_dropout=1.0)
  unconditional = build_model(dict(NETWORKS[name][0], num_classes=0))
  reference = jax.jit(unconditional.apply)({'params': _without(params, 'label')}, x, c_noise)
  null = jnp.full_like(cond, -1)
  np.testing.assert_allclose(apply({'params': params}, x, c_noise, null), reference, rtol=1e-5, atol=1e-5)
  dropped = apply({'params': params}, x, c_noise, cond, train=True, rngs={'dropout': jax.random.key(1)})
  np.testing.assert_allclose(dropped, reference, rtol=1e-5, atol=1e-5)
  assert not np.allclose(apply({'params': params}, x, c_noise, cond), reference, atol=1e-4)


@pytest.mark.parametrize('name', sorted(NETWORKS))
def test_adaptive_norm_takes_one_vocabulary_on_every_network(name):
  """'shift', 'scale_shift' and 'double' build on every network and compute different functions; 'double' is
  invariant to the scale of the modulation (pnorm); the old names 'film' / 'add' stop with one clear error."""
  outputs = {}
  for mode in ('shift', 'scale_shift', 'double'):
    model, params, (x, c_noise, cond), apply = _built(name, adaptive_norm=mode)
    outputs[mode] = apply({'params': params}, x, c_noise, cond)
    scaled = jax.tree_util.tree_map_with_path(
        lambda path, p: 3.0 * p if "'affine'" in jax.tree_util.keystr(path) else p, params)
    invariant = np.allclose(apply({'params': scaled}, x, c_noise, cond), outputs[mode], atol=1e-4)
    assert invariant == (mode == 'double'), mode
  assert not np.allclose(outputs['shift'], outputs['scale_shift'], atol=1e-4)
  for bad in ('film', 'add'):
    with pytest.raises(ValueError, match=rf"model.adaptive_norm='{bad}'; expected one of "
                                         r"\('shift', 'scale_shift', 'double'\)"):
      _built(name, adaptive_norm=bad)  # raised while tracing the initialisation


class _AdaptiveNormHost(nn.Module):
  mode: str

  @nn.compact
  def __call__(self, h, emb):
    return layers.adaptive_norm(self.mode, lambda v: v, h, emb)


def test_adaptive_norm_closed_forms():
  """With norm = identity and (s, b) = Dense(emb): h + b, h (1 + s) + b, h pnorm(s) + pnorm(b)."""
  rng = np.random.default_rng(0)
  h, emb = (jnp.asarray(rng.standard_normal(shape), jnp.float32) for shape in ((3, 4), (3, 5)))
  rms = lambda v: v / np.sqrt(np.mean(np.square(v), -1, keepdims=True))
  for mode, width in (('shift', 4), ('scale_shift', 8), ('double', 8)):
    kernel, bias = (jnp.asarray(rng.standard_normal(shape), jnp.float32) for shape in ((5, width), (width,)))
    out = _AdaptiveNormHost(mode).apply({'params': {'affine': {'kernel': kernel, 'bias': bias}}}, h, emb)
    params = np.asarray(emb @ kernel + bias)
    s, b = params[:, :4], params[:, 4:]
    expected = h + params if mode == 'shift' else h * (1 + s) + b if mode == 'scale_shift' else h * rms(s) + rms(b)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)


def test_guidance_student_from_its_teacher_computes_the_teacher_for_every_scale():
  """init_from_teacher keeps the student's initial guidance layer, which is zero: F_student(s) = F_teacher for all s."""
  _, teacher, (x, c_noise, cond), teacher_apply = _built('mlp', num_classes=3)
  student = build_model(dict(NETWORKS['mlp'][0], num_classes=3, guidance_embedding=True))
  fresh = student.init({'params': jax.random.key(1)}, x, c_noise, cond)['params']
  params = init_from_teacher(fresh, teacher)
  reference = teacher_apply({'params': teacher}, x, c_noise, cond)
  for s in (None, 1.0, 2.5):  # None: s = 1
    guidance = None if s is None else jnp.full((len(x),), s)
    np.testing.assert_allclose(student.apply({'params': params}, x, c_noise, cond, guidance=guidance),
                               reference, rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match='time_embed/label/kernel'):
    init_from_teacher(_without(fresh, 'label'), teacher)


@pytest.mark.parametrize('policy', ['block', 'dots_with_no_batch_dims_saveable'])
def test_remat_keeps_the_function_and_its_gradient(policy):
  config = dict(name='adm', channels=8, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), head_dim=8,
                dropout=0.1, num_classes=0)
  x, c_noise, _ = _inputs((2, 8, 8, 1), 0)
  plain, remat = build_model(config), build_model(dict(config, remat=policy))
  params = plain.init({'params': jax.random.key(0)}, x, c_noise)['params']
  params = _perturbed(params)  # non-zero output convs, so every block's gradient is non-zero

  def loss(model, params):
    out = model.apply({'params': params}, x, c_noise, train=True, rngs={'dropout': jax.random.key(1)})
    return jnp.sum(out**2)

  expected, actual = (jax.jit(jax.value_and_grad(functools.partial(loss, m)))(params) for m in (plain, remat))
  for e, a in zip(jax.tree.leaves(expected), jax.tree.leaves(actual)):  # recomputation reorders float32 sums only
    np.testing.assert_allclose(a, e, rtol=1e-3, atol=1e-4 * float(np.max(np.abs(e))))
  with pytest.raises(ValueError, match='model.remat'):
    build_model(dict(config, remat='everything')).init({'params': jax.random.key(0)}, x, c_noise)
