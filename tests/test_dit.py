"""The DiT backbone (models/dit.py): the DiT paper's parameter counts, parity with a PyTorch DiT written here from the
paper's equations, adaLN-Zero's identity start, the null class and the second time, jax.jvp against a float64
central difference (with and without the forward-mode flash kernel), remat, bfloat16, the FSDP rules and the
objectives on it."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from cm_jax import sharding
from cm_jax.models import attention, build_model, dit
from cm_jax.objectives import make_objective
from configs import digits_dit_flow_matching, digits_dit_meanflow, digits_imeanflow, imagenet256_meanflow

TINY = dict(name='dit', size='', depth=2, hidden=32, heads=4, patch_size=2, num_classes=5, label_dropout=0.1,
            second_time=True, time_scale=10.0)


def _init(model, shape, labels=True):
  x, t = jnp.zeros((2,) + shape), jnp.zeros((2,))
  cond = jnp.zeros((2,), jnp.int32) if labels else None
  return jax.jit(lambda: model.init({'params': jax.random.PRNGKey(0)}, x, t, cond)['params'])()


def _apply(model, params, *args, train=False, **kw):
  """model.apply, compiled (a tiny network compiles faster than it dispatches op by op)."""
  return jax.jit(lambda p, a, k: model.apply({'params': p}, *a, train=train, **k))(params, args, kw)


def _randomised(params, seed=0, scale=0.2):
  """Every parameter N(0, scale^2), the zero-initialised modulations and final layer included."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda p: jnp.asarray(scale * rng.standard_normal(p.shape), p.dtype), params)


def _count(model, shape, labels=True):
  shapes = jax.eval_shape(lambda: _init(model, shape, labels))
  return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(shapes))


@pytest.mark.parametrize('size,millions', [('S', 33), ('B', 130), ('L', 458), ('XL', 675)])
def test_parameter_counts_are_the_dit_papers(size, millions):
  """DiT paper Table 4: DiT-S/2 33M, B/2 130M, L/2 458M, XL/2 675M parameters on 32x32x4 latents, 1000 classes."""
  model = build_model(dict(name='dit', size=size, patch_size=2, num_classes=1000))
  assert round(_count(model, (32, 32, 4)) / 1e6) == millions


def test_second_time_adds_one_timestep_embedder():
  """MeanFlow's DiT embeds t - r by a second timestep MLP: 256 * hidden + hidden^2 + 2 hidden more parameters."""
  kw = dict(name='dit', size='B', num_classes=1000)
  extra = _count(build_model(dict(kw, second_time=True)), (32, 32, 4)) - _count(build_model(kw), (32, 32, 4))
  assert extra == 256 * 768 + 768**2 + 2 * 768


# ----------------------------------------------------------------------------------------------------------
# Parity: a PyTorch DiT from the paper's equations, the same weights.
# ----------------------------------------------------------------------------------------------------------
def _torch_dit(params, x, c_noise, labels, interval, *, depth, hidden, heads, patch, num_classes, time_scale):
  """DiT's forward in float64 torch, NCHW, written from the paper: patchify by a stride-p conv, 2-D sin-cos
  positions, c = MLP(sin(1000-style t)) + MLP(sin(t - r)) + table[y] (the null row for y < 0), adaLN-Zero blocks,
  the modulated final linear, unpatchify."""
  torch = pytest.importorskip('torch')
  f = torch.nn.functional
  tensor = lambda a: torch.tensor(np.asarray(a, np.float64))
  linear = lambda h, p: h @ tensor(p['kernel']) + tensor(p['bias'])  # x W^T + b with W^T = the flax kernel

  def sinusoids(s):  # [cos(s w_i), sin(s w_i)], w_i = 10000^(-i / 128)
    w = torch.exp(-np.log(10_000.0) * torch.arange(128, dtype=torch.float64) / 128)
    a = time_scale * s[:, None] * w[None]
    return torch.cat([torch.cos(a), torch.sin(a)], dim=1)

  def timestep_mlp(s, p):
    return linear(f.silu(linear(sinusoids(s), p['dense_0'])), p['dense_1'])

  def layer_norm(h):
    return f.layer_norm(h, (hidden,), eps=1e-6)

  def modulate(h, shift, scale):
    return h * (1 + scale[:, None]) + shift[:, None]

  x = tensor(x).permute(0, 3, 1, 2)
  b, chans, height, width = x.shape
  gh, gw = height // patch, width // patch
  weight = tensor(params['patch_embed']['kernel']).permute(3, 2, 0, 1)  # [hidden, C, p, p]
  h = f.conv2d(x, weight, tensor(params['patch_embed']['bias']), stride=patch).flatten(2).transpose(1, 2)
  quarter = hidden // 4
  w = 1.0 / 10_000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
  row = torch.arange(gh, dtype=torch.float64).repeat_interleave(gw)
  col = torch.arange(gw, dtype=torch.float64).repeat(gh)
  pos = torch.cat([torch.sin(col[:, None] * w), torch.cos(col[:, None] * w),
                   torch.sin(row[:, None] * w), torch.cos(row[:, None] * w)], dim=1)
  h = h + pos[None]
  y = torch.tensor(np.where(np.asarray(labels) < 0, num_classes, np.asarray(labels)))
  c = (timestep_mlp(tensor(c_noise), params['time_embed']) + timestep_mlp(tensor(interval), params['interval_embed'])
       + tensor(params['label_embed']['embedding'])[y])
  for i in range(depth):
    p = params[f'block_{i}']
    shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = linear(f.silu(c), p['modulation']).chunk(6, dim=1)
    q, k, v = linear(modulate(layer_norm(h), shift_a, scale_a), p['qkv']).reshape(
        b, -1, 3, heads, hidden // heads).permute(2, 0, 3, 1, 4)
    att = torch.softmax(q @ k.transpose(-1, -2) / np.sqrt(hidden // heads), dim=-1) @ v  # [B, H, L, d]
    h = h + gate_a[:, None] * linear(att.transpose(1, 2).reshape(b, -1, hidden), p['proj'])
    mlp = linear(f.gelu(linear(modulate(layer_norm(h), shift_m, scale_m), p['mlp_0']), approximate='tanh'),
                 p['mlp_1'])
    h = h + gate_m[:, None] * mlp
  shift, scale = linear(f.silu(c), params['final_modulation']).chunk(2, dim=1)
  out = linear(modulate(layer_norm(h), shift, scale), params['final_linear'])  # [B, L, p * p * C]
  out = out.reshape(b, gh, gw, patch, patch, chans)
  return torch.einsum('nhwpqc->nchpwq', out).reshape(b, chans, height, width).numpy()


def _parity_case(model, shape, seed):
  """(params, inputs, the torch reference) on `shape`: random non-zero weights, labels incl. the null class."""
  params = _randomised(_init(model, shape), seed=seed)
  x = np.random.default_rng(seed).standard_normal((3,) + shape).astype(np.float32)
  inputs = (x, np.array([0.1, 0.5, 0.9], np.float32), np.array([2, -1, 4], np.int32), np.array([0.0, 0.3, 0.6],
                                                                                              np.float32))
  reference = _torch_dit(jax.tree.map(np.asarray, params), *inputs, depth=2, hidden=32, heads=4, patch=2,
                         num_classes=5, time_scale=10.0)
  assert np.abs(reference).max() > 0.5  # a non-trivial output
  return params, inputs, reference


def _error(out, reference):
  return np.abs(np.asarray(out).transpose(0, 3, 1, 2) - reference).max() / np.abs(reference).max()


def test_matches_a_pytorch_dit_from_the_papers_equations():
  """Same weights (all non-zero: adaLN-Zero's zero start would hide a wrong modulation), 8x8x3 with patch 2 and a
  non-square 8x12 input, labels incl. the null class, the interval: float32 JAX vs float64 torch to 1e-5 of the
  output's scale; float64 JAX to 1e-6 (float64 but for the float32 constants of the sinusoids' frequencies)."""
  model = build_model(TINY)
  for seed, shape in enumerate(((8, 8, 3), (8, 12, 3))):
    params, (x, c_noise, labels, interval), reference = _parity_case(model, shape, seed)
    assert _error(_apply(model, params, x, c_noise, labels, interval=interval), reference) < 1e-5
  with jax.enable_x64(True):
    f64 = lambda a: jax.tree.map(lambda b: jnp.asarray(b, jnp.float64), a)
    out = _apply(model.clone(dtype='float64'), f64(params), f64(x), f64(c_noise), labels, interval=f64(interval))
    assert _error(out, reference) < 1e-6


def test_adaln_zero_starts_at_zero_and_grads_reach_the_final_layer():
  """At init the modulations and the final linear are zero: F = 0 for any input; the final linear's gradient is not."""
  model = build_model(TINY)
  params = _init(model, (8, 8, 3))
  for name in ('block_0', 'block_1'):
    assert not np.any(params[name]['modulation']['kernel'])
  x = jnp.asarray(np.random.default_rng(2).standard_normal((2, 8, 8, 3)), jnp.float32)
  args = (x, jnp.array([0.2, 0.7]), jnp.array([1, 3]))
  assert not np.any(_apply(model, params, *args))
  grads = jax.jit(jax.grad(lambda p: jnp.sum(model.apply({'params': p}, *args) * x)))(params)
  assert np.abs(grads['final_linear']['kernel']).max() > 0


def test_null_class_dropout_and_the_second_time():
  """Label -1 is the learned null row; label_dropout 1 in training gives it for every label; interval None is 0 and
  a non-zero interval changes the output; a one-time DiT refuses an interval."""
  model = build_model(TINY)
  params = _randomised(_init(model, (8, 8, 3)), seed=3)
  x = jnp.asarray(np.random.default_rng(4).standard_normal((2, 8, 8, 3)), jnp.float32)
  t = jnp.array([0.3, 0.8])
  apply = lambda m, cond, **kw: _apply(m, params, x, t, jnp.asarray(cond), **kw)
  null = apply(model, [-1, -1])
  assert np.abs(np.asarray(null - apply(model, [0, 0]))).max() > 1e-3
  always = model.clone(label_dropout=1.0)
  np.testing.assert_allclose(apply(always, [1, 2], train=True, rngs={'dropout': jax.random.PRNGKey(0)}), null,
                             atol=1e-6)
  np.testing.assert_allclose(apply(model, [1, 2]), apply(model, [1, 2], interval=jnp.zeros(2)), atol=1e-6)
  assert np.abs(np.asarray(apply(model, [1, 2]) - apply(model, [1, 2], interval=jnp.array([0.2, 0.5])))).max() > 1e-3
  one_time = build_model(dict(TINY, second_time=False))
  with pytest.raises(ValueError, match='second_time=True'):
    one_time.init(jax.random.PRNGKey(0), x, t, jnp.array([1, 2]), interval=jnp.zeros(2))


@pytest.mark.parametrize('fields,match', [
    (dict(patch_size=3), 'patch_size=3 does not divide'),
    (dict(size='M'), "model.size='M'"),
    (dict(heads=5), 'heads must divide hidden'),
])
def test_bad_fields_name_the_cause(fields, match):
  with pytest.raises(ValueError, match=match):
    _init(build_model(dict(TINY, **fields)), (8, 8, 3))


def test_remat_and_bfloat16():
  """remat='block' recomputes without changing values or gradients; bfloat16 compute keeps float32 parameters and
  output, within bfloat16's precision of the float32 network."""
  model = build_model(TINY)
  params = _randomised(_init(model, (8, 8, 3)), seed=5, scale=0.1)
  x = jnp.asarray(np.random.default_rng(6).standard_normal((2, 8, 8, 3)), jnp.float32)
  args = (x, jnp.array([0.2, 0.7]), jnp.array([1, -1]))
  loss = lambda m: jax.jit(jax.value_and_grad(lambda p: jnp.sum(m.apply({'params': p}, *args) ** 2)))(params)
  (value, grads), (value_r, grads_r) = loss(model), loss(model.clone(remat='block'))
  np.testing.assert_allclose(value_r, value, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), grads_r, grads)
  bf16 = model.clone(dtype='bfloat16')
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(_init(bf16, (8, 8, 3))))
  out, out_bf16 = _apply(model, params, *args), _apply(bf16, params, *args)
  assert out_bf16.dtype == jnp.float32
  assert np.linalg.norm(out_bf16 - out) / np.linalg.norm(out) < 3e-2


# ----------------------------------------------------------------------------------------------------------
# Forward mode: MeanFlow's du/dt along (v, 0, 1) by one jax.jvp, against a float64 central difference.
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('kernel', ['xla', 'flash'])
def test_jvp_matches_float64_central_difference(kernel, monkeypatch):
  """d/dh u(z + h v, r, t + h) with u(z, r, t) = F(z, t, interval = t - r); 'flash' runs the forward-mode flash kernel
  (attention.forward_mode, interpreted) over 128 tokens (a 16x32 input in 2x2 patches)."""
  monkeypatch.setattr(attention, 'FLASH_MIN_LENGTH', {'flash': 128, 'flash_jvp': 128})
  model = build_model(dict(TINY, heads=2, attention_kernel=kernel))
  shape = (16, 32, 3)
  plain = model.clone(attention_kernel='xla')
  params = _randomised(_init(plain, shape), seed=7, scale=0.15)
  rng = np.random.default_rng(8)
  z, v = (jnp.asarray(rng.standard_normal((2,) + shape), jnp.float32) for _ in range(2))
  t, r, cond = jnp.array([0.6, 0.9]), jnp.array([0.2, 0.9]), jnp.array([1, 3])
  jvp_model = attention.forward_mode(model)
  assert jvp_model.attention_kernel == ('flash_jvp' if kernel == 'flash' else 'xla')
  u = lambda z, r, t: jvp_model.apply({'params': params}, z, t, cond, interval=t - r)
  with pltpu.force_tpu_interpret_mode():
    dudt = jax.jit(lambda: jax.jvp(u, (z, r, t), (v, jnp.zeros_like(r), jnp.ones_like(t)))[1])()
  with jax.enable_x64(True):
    p64 = jax.tree.map(lambda p: jnp.asarray(p, jnp.float64), params)
    f64 = jax.jit(lambda h: plain.clone(dtype='float64').apply(
        {'params': p64}, jnp.asarray(z, jnp.float64) + h * jnp.asarray(v, jnp.float64), jnp.asarray(t, jnp.float64)
        + h, cond, interval=jnp.asarray(t - r, jnp.float64) + h))
    reference = np.asarray((f64(1e-5) - f64(-1e-5)) / 2e-5)
  scale = np.linalg.norm(reference)
  assert scale > 1.0
  assert np.linalg.norm(np.asarray(dudt) - reference) / scale < 1e-3


# ----------------------------------------------------------------------------------------------------------
# Sharding and the objectives.
# ----------------------------------------------------------------------------------------------------------
def test_mesh_rules_shard_every_large_dit_xl_leaf_over_16_devices():
  """dit.MESH_RULES on {data: 1, fsdp: 16}: every leaf of DiT-XL/2 over min_size is sharded (the patch embedding
  and the label table on their hidden axis), where the default kernel rule cannot split the patch embedding's
  4 input channels."""
  model = build_model(dict(name='dit', size='XL', num_classes=1000, second_time=True))
  shapes = jax.eval_shape(lambda: _init(model, (32, 32, 4)))
  flat = {sharding.tree_path(k): v.shape for k, v in jax.tree_util.tree_flatten_with_path(shapes)[0]}
  axes, min_size = {'data': 1, 'fsdp': 16}, 2**14
  specs = {k: sharding.partition_spec(k, s, dit.MESH_RULES, min_size, axes) for k, s in flat.items()}
  assert specs['patch_embed/kernel'] == jax.sharding.PartitionSpec(None, None, None, 'fsdp')
  assert specs['label_embed/embedding'] == jax.sharding.PartitionSpec(None, 'fsdp')
  assert specs['block_27/mlp_1/kernel'] == jax.sharding.PartitionSpec('fsdp', None)
  unsharded = [k for k, s in flat.items() if np.prod(s) >= min_size and specs[k] == jax.sharding.PartitionSpec()]
  assert not unsharded
  with pytest.raises(ValueError, match='patch_embed/kernel'):
    sharding.partition_spec('patch_embed/kernel', flat['patch_embed/kernel'], ((r'kernel$', ('fsdp', None)),),
                            min_size, axes)


@pytest.mark.parametrize('objective', ['edm', 'trigflow', 'flow_matching', 'meanflow', 'imeanflow'])
def test_objectives_train_a_dit(objective):
  """One loss and gradient of each objective on the digits DiT: finite, and the gradient reaches every block."""
  config = (digits_dit_meanflow if 'meanflow' in objective else digits_dit_flow_matching).get_config()
  if objective == 'imeanflow':
    config.objective = digits_imeanflow.get_config().objective
  config.model.update(depth=1, hidden=32, heads=2)
  if objective in ('edm', 'trigflow'):
    config.parameterization = ml_collections.ConfigDict(dict(
        name=objective, sigma_data=0.5, sigma_min=0.002, sigma_max=80.0, rho=7.0))
    config.objective = ml_collections.ConfigDict(dict(name='edm', p_mean=-1.2, p_std=1.2) if objective == 'edm'
                                                 else dict(name='trigflow', p_mean=-1.0, p_std=1.4))
  model = build_model(config.model)
  params = _randomised(_init(model, (8, 8, 1), labels=False), seed=9, scale=0.1)
  obj = make_objective(config, model)
  batch = {'image': jnp.asarray(np.random.default_rng(10).uniform(-1, 1, (4, 8, 8, 1)), jnp.float32),
           'label': jnp.zeros((4,), jnp.int32)}
  (value, _), grads = jax.jit(jax.value_and_grad(lambda p: obj.loss(p, {}, {}, batch, jax.random.PRNGKey(0), 0),
                                                 has_aux=True))(params)
  assert np.isfinite(value) and value > 0
  assert np.abs(grads['block_0']['qkv']['kernel']).max() > 0


def test_imagenet256_meanflow_builds_dit_xl2_on_sd_vae_latents():
  """The paper's MF-XL/2 run: DiT-XL/2 with the second time on 32x32x4 latents, 1000 classes, labels dropped
  by the objective (0.1), the DiT mesh rules; the objective accepts the network."""
  config = imagenet256_meanflow.get_config()
  model = build_model(config.model)
  assert (model.dims(), model.patch_size, model.second_time) == ((28, 1152, 16), 2, True)
  assert config.model.num_classes == 1000 and config.objective.class_dropout == 0.1
  assert tuple(map(tuple, config.mesh.rules)) == tuple(map(tuple, dit.MESH_RULES))
  make_objective(config, model)
