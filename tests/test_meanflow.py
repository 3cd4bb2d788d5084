"""MeanFlow's guided target and improved MeanFlow's loss, against numpy on a tiny linear two-time network.

The network u(z, r, t | y, s) = z A + t b + (t - r) c + onehot(y) E + (s - 1) g is linear, so its velocity
u(z, t, t), its total derivative du/dt = tangent A + b + c along (tangent, dr = 0, dt = 1) and the gradient of the
loss in A (z^T times the residual: only the trained u carries A, the targets are stop-gradient) are written in numpy
here (also through the separate du/dt pass of a network with a non-float32 dtype: `Typed`). Every coefficient
is nonzero and the options are off their neutral values (omega != 1, kappa != 0, a guidance
interval that excludes some t, dropped labels), so a wrong sign, t for r, v for the tangent or a missing
stop-gradient changes the numbers. The step's one jax.jvp (u and du/dt together) is checked against the two-pass
formulation on a small MLP, and the forward-mode attention kernel's primal against XLA's gradient.
"""

import flax.linen as nn
import jax
from jax.experimental.pallas import tpu as pltpu
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from cm_jax import experiment
from cm_jax import sampling
from cm_jax.models import attention, build_model
from cm_jax.models.apply import network
from cm_jax.objectives import imeanflow, make_objective, meanflow
from cm_jax.parameterization import FlowMatching
from configs import digits_imeanflow, digits_meanflow

FM = FlowMatching()
B, D, K = 24, 3, 4
NORM_C = 5.0  # large against ||delta||^2, so the adaptive weight does not flatten the loss to ~1


class Linear(nn.Module):
  """u(z, r, t | y, s) = z A + t b + (t - r) c + onehot(y) E + (s - 1) g (interval = t - r; label < 0: no label)."""
  second_time: bool = True
  guidance_embedding: bool = False

  @nn.compact
  def __call__(self, z, c_noise, cond=None, train=False, guidance=None, interval=None):
    p = lambda name, shape: self.param(name, nn.initializers.zeros, shape)
    out = z @ p('A', (D, D)) + c_noise[:, None] * p('b', (D,)) + interval[:, None] * p('c', (D,))
    out = out + jax.nn.one_hot(cond, K) @ p('E', (K, D))
    if self.guidance_embedding:
      out = out + (guidance - 1.0)[:, None] * p('g', (D,))
    return out


class Typed(Linear):
  """Linear with a bfloat16 `dtype` field (unused: it computes in float32), so the objective takes the separate
  float32 du/dt pass of objective.jvp_dtype='float32'."""
  dtype: str = 'bfloat16'


def _params(seed=0):
  rng = np.random.default_rng(seed)
  shapes = {'A': (D, D), 'b': (D,), 'c': (D,), 'E': (K, D), 'g': (D,)}
  return {k: 0.5 * rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}


def np_u(p, z, t, h, y, s=None):
  """numpy u(z, t - h, t | y, s); y < 0 embeds as zero."""
  onehot = np.where(y[:, None] >= 0, np.eye(K)[np.maximum(y, 0)], 0.0)
  out = z @ p['A'] + t[:, None] * p['b'] + h[:, None] * p['c'] + onehot @ p['E']
  return out if s is None else out + (s - 1.0)[:, None] * p['g']


def _config(name, **objective):
  base = dict(name=name, p_mean=-0.4, p_std=1.0, flow_share=0.5, norm_p=1.0, norm_c=NORM_C)
  return ml_collections.ConfigDict(dict(objective=dict(base, **objective), model=dict(num_classes=K),
                                        parameterization=dict(name='flow_matching')))


def _batch(seed=1):
  rng = np.random.default_rng(seed)
  return {'image': jnp.asarray(0.3 + 0.8 * rng.standard_normal((B, D)), jnp.float32),
          'label': jnp.asarray(rng.integers(0, K, B), jnp.int32)}


def _value_and_grad_a(objective, params, batch, rng):
  f = lambda a: objective.loss(dict(params, A=a), {}, {}, batch, rng, 0)[0]
  value, grad = jax.value_and_grad(f)(jnp.asarray(params['A']))
  return float(value), np.asarray(grad)


def _weighted(delta, p, c):
  """(mean_i w_i ||delta_i||^2, w) with w = 1 / (||delta||^2 + c)^p."""
  sq = np.sum(delta**2, axis=-1)
  w = 1.0 / (sq + c) ** p
  return np.mean(w * sq), w


@pytest.mark.parametrize('module', [Linear, Typed])
def test_meanflow_guided_target_and_loss_match_numpy(module):
  """u_tgt = v_g - (t - r) (v_g A + b + c), v_g = omega v + (1 - omega - kappa) u(z,t,t|none) + kappa u(z,t,t|y)
  inside the interval, v outside it and for a dropped label (whose input label is none); by one JVP (Linear) and by
  the separate float32 pass (Typed)."""
  omega, kappa, interval = 2.5, 0.4, (0.3, 0.8)
  config = _config('meanflow', cfg_omega=omega, cfg_kappa=kappa, cfg_interval=interval, class_dropout=0.3)
  objective = make_objective(config, module())
  params, batch, rng = _params(), _batch(), jax.random.PRNGKey(7)
  t, r, e, drop = (np.asarray(a, np.float64) for a in meanflow.draw(
      jax.random.split(rng)[0], batch['image'], config.objective, FM, True))
  drop = drop.astype(bool)
  assert 0 < drop.sum() < B and 0 < np.sum(r < t) < B
  inside = (t >= interval[0]) & (t <= interval[1])
  assert 0 < inside.sum() < B
  p = {k: np.asarray(a, np.float64) for k, a in params.items()}
  x, y = np.asarray(batch['image'], np.float64), np.asarray(batch['label'])
  z, v = (1 - t[:, None]) * x + t[:, None] * e, e - x
  zero, null = np.zeros(B), np.full(B, -1)
  w, k = np.where(inside, omega, 1.0)[:, None], np.where(inside, kappa, 0.0)[:, None]
  v_g = w * v + (1 - w - k) * np_u(p, z, t, zero, null) + k * np_u(p, z, t, zero, y)
  v_g = np.where(drop[:, None], v, v_g)
  y_in = np.where(drop, -1, y)
  u = np_u(p, z, t, t - r, y_in)
  u_tgt = v_g - (t - r)[:, None] * (v_g @ p['A'] + p['b'] + p['c'])
  expected, weight = _weighted(u - u_tgt, 1.0, NORM_C)
  grad = 2.0 / B * np.einsum('b,bi,bj->ij', weight, z, u - u_tgt)
  value, got_grad = _value_and_grad_a(objective, params, batch, rng)
  np.testing.assert_allclose(value, expected, rtol=1e-5)
  np.testing.assert_allclose(got_grad, grad, rtol=1e-4, atol=1e-6)
  # The mutants: the tangent v instead of v_g, and the label not dropped, each move the loss.
  wrong_tangent = v_g - (t - r)[:, None] * (v @ p['A'] + p['b'] + p['c'])
  assert abs(_weighted(u - wrong_tangent, 1.0, NORM_C)[0] - expected) > 1e-3
  assert abs(_weighted(np_u(p, z, t, t - r, y) - u_tgt, 1.0, NORM_C)[0] - expected) > 1e-3


def test_meanflow_without_guidance_is_the_plain_target():
  """omega = 1, kappa = 0 (the defaults): v_g = v for every example, guided interval or not."""
  config = _config('meanflow', class_dropout=0.0)
  params, batch, rng = _params(2), _batch(3), jax.random.PRNGKey(8)
  t, r, e, _ = (np.asarray(a, np.float64) for a in meanflow.draw(
      jax.random.split(rng)[0], batch['image'], config.objective, FM, True))
  p = {k: np.asarray(a, np.float64) for k, a in params.items()}
  x, y = np.asarray(batch['image'], np.float64), np.asarray(batch['label'])
  z, v = (1 - t[:, None]) * x + t[:, None] * e, e - x
  u_tgt = v - (t - r)[:, None] * (v @ p['A'] + p['b'] + p['c'])
  expected, _ = _weighted(np_u(p, z, t, t - r, y) - u_tgt, 1.0, NORM_C)
  value, _ = _value_and_grad_a(make_objective(config, Linear()), params, batch, rng)
  np.testing.assert_allclose(value, expected, rtol=1e-5)


@pytest.mark.parametrize('s_max, module', [(0.0, Linear), (3.0, Linear), (3.0, Typed)])
def test_imeanflow_loss_matches_numpy(s_max, module):
  """V = u(z, r, t | y_in, omega) + (t - r) (v_c A + b + c), v_c = u(z, t, t | y, w) the tangent (w = omega inside
  the interval, 1 outside), target v_g = v + (1 - 1/w) (v_c - u(z, t, t | none, 1)) (v for a dropped label); the
  gradient in A is that of u alone (du/dt stop-gradient)."""
  interval = (0.25, 0.85)
  config = _config('imeanflow', cfg_scale_max=s_max, cfg_interval=interval, class_dropout=0.3)
  guided = s_max > 0
  model = module(guidance_embedding=guided)
  objective = make_objective(config, model)
  assert objective.sampler is sampling.MEANFLOW and objective.feeds_guidance == guided
  params, batch, rng = _params(4), _batch(5), jax.random.PRNGKey(9)
  rng_draw, rng_omega, _ = jax.random.split(rng, 3)
  t, r, e, drop = (np.asarray(a, np.float64) for a in meanflow.draw(rng_draw, batch['image'], config.objective, FM,
                                                                     True))
  drop = drop.astype(bool)
  omega = np.asarray(imeanflow.sample_cfg_scale(rng_omega, B, s_max, 1.0), np.float64) if guided else np.ones(B)
  p = {k: np.asarray(a, np.float64) for k, a in params.items()}
  if not guided:
    p['g'] = np.zeros(D)
  x, y = np.asarray(batch['image'], np.float64), np.asarray(batch['label'])
  z, v = (1 - t[:, None]) * x + t[:, None] * e, e - x
  zero = np.zeros(B)
  inside = (t >= interval[0]) & (t <= interval[1])
  assert 0 < inside.sum() < B and 0 < drop.sum() < B
  w = np.where(inside, omega, 1.0)
  v_c = np_u(p, z, t, zero, y, w)
  v_g = v + (1 - 1 / w)[:, None] * (v_c - np_u(p, z, t, zero, np.full(B, -1), np.ones(B))) if guided else v
  v_g = np.where(drop[:, None], v, v_g)
  u = np_u(p, z, t, t - r, np.where(drop, -1, y), omega)
  V = u + (t - r)[:, None] * (v_c @ p['A'] + p['b'] + p['c'])
  expected, weight = _weighted(V - v_g, 1.0, NORM_C)
  grad = 2.0 / B * np.einsum('b,bi,bj->ij', weight, z, V - v_g)
  value, got_grad = _value_and_grad_a(objective, params, batch, rng)
  np.testing.assert_allclose(value, expected, rtol=1e-5)
  np.testing.assert_allclose(got_grad, grad, rtol=1e-4, atol=1e-6)
  # The mutants: the sample's v as the tangent (MeanFlow's), and r for t in the (t - r) factor's sign.
  assert abs(_weighted(u + (t - r)[:, None] * (v @ p['A'] + p['b'] + p['c']) - v_g, 1.0, NORM_C)[0] - expected) > 1e-3
  assert abs(_weighted(u - (t - r)[:, None] * (v_c @ p['A'] + p['b'] + p['c']) - v_g, 1.0, NORM_C)[0] - expected) > 1e-3
  # Without the stop-gradient on du/dt the gradient in A would gain (t - r) v_c^T (V - v_g) terms.
  leak = 2.0 / B * np.einsum('b,b,bi,bj->ij', weight, t - r, v_c, V - v_g)
  assert np.abs(leak).max() > 1e-2


def test_jvp_networks_share_the_trained_forward_unless_float32_is_asked_of_another_dtype():
  """One JVP (None for the separate network) for a float32 network or jvp_dtype='model'; else a float32 clone."""
  assert meanflow.jvp_networks(Linear(), 'float32') == (Linear(), None)
  assert meanflow.jvp_networks(Typed(), 'model') == (Typed(), None)
  assert meanflow.jvp_networks(Typed(), 'float32') == (Typed(), Typed(dtype='float32'))
  flash = build_model(dict(name='dit', patch_size=2, hidden=8, depth=1, heads=2, attention_kernel='flash'))
  assert meanflow.jvp_networks(flash, 'model')[0].attention_kernel == 'flash_jvp'


def _two_pass(name, model, config, params, batch, rng):
  """The loss of an unconditional, unguided MeanFlow (iMF) step written out with du/dt and u in separate passes:
  du/dt = jax.jvp of u(sg(params)) along (tangent, 0, 1), then u(params) by a second forward (the former design)."""
  obj = config.objective
  rng_draw, *rest = jax.random.split(rng, 2 if name == 'meanflow' else 3)
  t, r, e, _ = meanflow.draw(rng_draw, batch['image'], obj, FM, False)
  z, v = FM.noise(batch['image'], e, t), FM.target_velocity(batch['image'], e)
  u_fn = lambda p: meanflow.two_time(FM, network(model, p, None, rest[-1]))
  sg = jax.lax.stop_gradient(params)
  tangent = v if name == 'meanflow' else meanflow.two_time(FM, network(model, sg, None))(z, t, t)
  _, dudt = jax.jvp(u_fn(sg), (z, r, t), (tangent, jnp.zeros_like(r), jnp.ones_like(t)))
  u, gap = u_fn(params)(z, r, t), (t - r)[:, None]
  delta = u - (v - gap * dudt) if name == 'meanflow' else u + gap * dudt - v
  sq = jnp.sum(delta**2, -1)
  return jnp.mean(jax.lax.stop_gradient(1.0 / (sq + NORM_C)) * sq)


@pytest.mark.parametrize('name', ['meanflow', 'imeanflow'])
def test_one_jvp_loss_and_gradient_equal_the_two_pass_formulation(name):
  """On a small residual MLP (nonlinear: the tangent's second-order terms differ from u's gradient), the step's one
  jax.jvp gives the loss and the gradient of the separate passes written out in `_two_pass` (float32, ~1e-6)."""
  model = build_model(dict(name='mlp', hidden=16, depth=2, second_time=True, time_embedding='positional',
                           time_scale=1.0))
  config = _config(name, class_dropout=0.0)
  config.model.num_classes = 0
  batch = {'image': _batch(11)['image']}
  times = (jnp.full((B,), 0.5), jnp.full((B,), 0.2))
  params = model.init(jax.random.PRNGKey(3), batch['image'], times[0], interval=times[1])['params']
  params = jax.tree.map(lambda a: a + 0.3 * jax.random.normal(jax.random.PRNGKey(a.size), a.shape), params)
  objective, rng = make_objective(config, model), jax.random.PRNGKey(12)
  value, grad = jax.value_and_grad(lambda p: objective.loss(p, {}, {}, batch, rng, 0)[0])(params)
  want, want_grad = jax.value_and_grad(lambda p: _two_pass(name, model, config, p, batch, rng))(params)
  np.testing.assert_allclose(value, want, rtol=1e-6)
  scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(want_grad))
  assert scale > 1e-3
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * scale), grad, want_grad)


def test_forward_mode_attention_differentiates_its_primal(monkeypatch):
  """The one-JVP step's jax.grad of the JVP's primal through 'flash_jvp' (Pallas, interpreted; 256 positions in two
  blocks, the primal by 'flash' at >= 128 positions) equals XLA attention's, the tangent too; the tangent carries
  no gradient (sg(dO) in the loss, as every objective has it)."""
  monkeypatch.setattr(attention, 'FLASH_MIN_LENGTH', {'flash': 128, 'flash_jvp': 128})
  monkeypatch.setattr(attention, 'FLASH_BLOCK', 128)
  arrays = np.random.default_rng(0).standard_normal((6, 1, 256, 1, 16))
  q, k, v, dq, dk, dv = (jnp.asarray(a, jnp.float32) for a in arrays)

  def loss(q, k, v, kernel):
    out, tangent = jax.jvp(lambda *a: attention.attention(*a, kernel=kernel), (q, k, v), (dq * q, dk, dv))
    return jnp.sum(jnp.sin(out) * jax.lax.stop_gradient(tangent)), tangent

  with pltpu.force_tpu_interpret_mode():
    (_, tangent), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v, 'flash_jvp')
  (_, want_tangent), want = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v, 'xla')
  np.testing.assert_allclose(tangent, want_tangent, atol=2e-5)
  for got, expected in zip(grads, want):
    assert np.abs(expected).max() > 0.1
    np.testing.assert_allclose(got, expected, atol=2e-5)


@pytest.mark.parametrize('beta', [1.0, 0.5])
def test_cfg_scale_has_the_power_density(beta):
  """omega in [1, 1 + s_max] with density ~ omega^-beta: its mean against the integral, and the range."""
  s_max = 7.0
  omega = np.asarray(imeanflow.sample_cfg_scale(jax.random.PRNGKey(0), 400_000, s_max, beta))
  grid = np.linspace(1.0, 1.0 + s_max, 200_001)
  density = grid**-beta
  mean = np.trapezoid(grid * density, grid) / np.trapezoid(density, grid)
  assert omega.min() >= 1.0 and omega.max() <= 1.0 + s_max
  assert abs(omega.mean() - mean) < 0.01 * mean


def test_meanflow_sampler_feeds_the_guidance_scale():
  """A guidance-input network is sampled with sampling.guidance_scale (or the call's scale): u's (s - 1) g term."""
  model = Linear(guidance_embedding=True)
  config = ml_collections.ConfigDict(dict(sampling=dict(guidance_scale=3.0)))
  sample = sampling.MEANFLOW.build(config, model, FM)
  params = {k: jnp.zeros_like(jnp.asarray(a)) for k, a in _params().items()}
  params['g'] = jnp.asarray([1.0, -2.0, 0.5])
  cond = jnp.full((2,), -1)
  e = np.asarray(jax.random.normal(jax.random.split(jax.random.PRNGKey(0))[0], (2, D)))
  for scale, kwargs in ((3.0, {}), (1.5, {'guidance': 1.5})):
    x = np.asarray(sample(params, jax.random.PRNGKey(0), cond, (2, D), 1, **kwargs))
    np.testing.assert_allclose(x, e - (scale - 1.0) * np.asarray(params['g']), rtol=1e-5)


def test_bad_settings_raise_naming_the_option():
  with pytest.raises(ValueError, match='jvp_dtype'):
    make_objective(_config('meanflow', jvp_dtype='bfloat16'), Linear())
  with pytest.raises(ValueError, match='aux_v_head'):
    make_objective(_config('imeanflow', aux_v_head=True), Linear())
  with pytest.raises(ValueError, match='cfg_interval_sampling'):
    make_objective(_config('imeanflow', cfg_interval_sampling=True), Linear())
  with pytest.raises(ValueError, match='cfg_interval'):
    make_objective(_config('meanflow', cfg_interval=(0.5, 1.2)), Linear())
  with pytest.raises(ValueError, match='cfg_interval'):
    make_objective(_config('imeanflow', cfg_interval=(0.7, 0.2)), Linear())
  with pytest.raises(ValueError, match='guidance_embedding=True'):
    make_objective(_config('imeanflow', cfg_scale_max=7.0), Linear())
  with pytest.raises(ValueError, match='cfg_scale_max=0'):
    make_objective(_config('imeanflow'), Linear(guidance_embedding=True))
  unconditional = _config('meanflow', cfg_omega=2.0)
  unconditional.model.num_classes = 0
  with pytest.raises(ValueError, match='num_classes > 0'):
    make_objective(unconditional, Linear())
  with pytest.raises(ValueError, match='label_dropout=0'):
    make_objective(_config('meanflow'), build_model(dict(name='mlp', hidden=8, depth=1, second_time=True,
                                                         num_classes=K, label_dropout=0.1)))
  with pytest.raises(ValueError, match='second_time=True'):
    make_objective(_config('imeanflow'), build_model(dict(name='mlp', hidden=8, depth=1)))
  with pytest.raises(ValueError, match='unknown objective key'):
    make_objective(_config('imeanflow', cfg_omega=2.0), Linear())


def test_the_digits_configs_build():
  """(imeanflow through the trainer: test_flow_matching.test_train_steps_run_through_the_trainer.)"""
  for module in (digits_meanflow, digits_imeanflow):
    config = module.get_config()
    experiment.check_config(config)
    make_objective(config, build_model(config.model))
