"""Continuous-time consistency objectives: sCT / sCD (TrigFlow, jax.jvp) and the CM paper's continuous CT / CD.

Gaussian oracle in TrigFlow (data x0 ~ N(0, a^2 I), z ~ N(0, sd^2 I), x_t = cos(t) x0 + sin(t) z):
  x_t ~ N(0, v(t) I) with v(t) = a^2 cos^2 t + sd^2 sin^2 t, and E[x0 | x_t] = a^2 cos(t) / v(t) x_t.
  PF-ODE velocity: dx_t/dt = (cos(t) x_t - E[x0 | x_t]) / sin(t) = cos(t) (1 - a^2 / v) x_t / sin(t)
                            = cos(t) sin(t) (sd^2 - a^2) / v(t) x_t = (1/2) (d ln v / dt) x_t,
  so along a trajectory x_t / sqrt(v(t)) is constant and the exact consistency function is
  f*(x, t) = x a / sqrt(v(t))  (f*(x, 0) = x; for a = sd the flow is static and f* = identity).
  The exact teacher network is F_teacher = (dx_t/dt) / sd, and f = cos(t) x - sin(t) sd F gives
  F* = (cos(t) x - f*(x, t)) / (sin(t) sd).
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
from cm_jax import solvers
from cm_jax.models import attention, build_model, init_from_teacher
from cm_jax.objectives import continuous, make_objective
from cm_jax.parameterization import EDM, TrigFlow
from configs import digits_scd, digits_trigflow
from helpers import tiny_config
from oracle import EDM_, EPS, SD, T, OracleNet, TrigFlowOracle

TF = TrigFlow(sigma_data=SD)


def _scm_config(name='scd', **overrides):
  obj = dict(name=name, p_mean=-1.0, p_std=1.4, tangent_warmup_steps=10, tangent_norm='l2', tangent_norm_c=0.1,
             adaptive_weighting=False, prior_weighting=True, jvp='jvp', fd_eps=1e-3)
  if name == 'scd':
    obj.update(teacher='trigflow', guidance_scale=(1.0, 1.0))
  obj.update(overrides)
  return ml_collections.ConfigDict(dict(objective=obj, model=dict(num_classes=0), parameterization=dict(
      name='trigflow', sigma_data=SD, sigma_min=0.002, sigma_max=80.0, rho=7.0)))


# ----------------------------------------------------------------------------------------------------------
# The tangent: one jax.jvp == float64 central difference, on the real UNet.
# ----------------------------------------------------------------------------------------------------------
def test_scm_jvp_matches_float64_central_difference_on_unet():
  """sd cos sin dF/dt from the rearranged tangent, divided by sd cos sin, equals d/dh F((x_t + h dx_t/dt)/sd, t + h)."""
  model = build_model(dict(name='unet', channels=8, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,),
                           time_embedding='positional', time_scale=1000.0, adaptive_norm='double'))
  rng = np.random.default_rng(0)
  x_t = jnp.asarray(rng.standard_normal((2, 8, 8, 1)) * SD, jnp.float32)
  dxdt = jnp.asarray(rng.standard_normal((2, 8, 8, 1)) * SD, jnp.float32)
  t = jnp.asarray([0.3, 1.2], jnp.float32)
  params = model.init(jax.random.PRNGKey(0), x_t, t)['params']
  params = jax.tree.map(lambda p: p + 0.1 * jnp.asarray(rng.standard_normal(p.shape), p.dtype), params)
  cs = jnp.cos(t) * jnp.sin(t)
  bc = lambda v: v[:, None, None, None]
  net = lambda x, c: model.apply({'params': params}, x, c)

  tangent = jax.jit(lambda: continuous.directional_derivative(net, x_t / SD, t, bc(cs) * dxdt, cs * SD)[1])
  jvp = tangent() / bc(SD * cs)
  with jax.enable_x64(True):
    p64 = jax.tree.map(lambda p: jnp.asarray(p, jnp.float64), params)
    f64 = jax.jit(lambda h: model.apply({'params': p64}, (jnp.asarray(x_t, jnp.float64) + h * dxdt) / SD,
                                jnp.asarray(t, jnp.float64) + h))
    reference = np.asarray((f64(1e-5) - f64(-1e-5)) / 2e-5)
  scale = np.linalg.norm(reference)
  assert scale > 1.0  # a non-trivial derivative
  assert np.linalg.norm(jvp - reference) / scale < 1e-3  # float32 JVP vs float64


def test_finite_difference_fallback_matches_jvp():
  """The central difference moves the time by fd_eps t; it must resolve the time embedding's highest frequency
  (time_scale = 1000 here: fd_eps t 1000 << 1), so 1e-3 is too coarse for this network and 1e-4 is not."""
  model = build_model(dict(name='mlp', hidden=32, depth=2, time_embedding='positional', time_scale=1000.0))
  rng = np.random.default_rng(0)
  x, dx = (jnp.asarray(rng.standard_normal((16, 4)), jnp.float32) for _ in range(2))
  t = jnp.asarray(rng.uniform(0.05, 1.5, 16), jnp.float32)
  params = model.init(jax.random.PRNGKey(0), x, t)['params']
  params = jax.tree.map(lambda p: p + 0.1 * jnp.asarray(rng.standard_normal(p.shape), p.dtype), params)
  net = lambda x, c: model.apply({'params': params}, x, c)
  derivative = jax.jit(lambda m, e: continuous.directional_derivative(net, x, t, dx, jnp.ones_like(t), m, e),
                       static_argnums=0)
  (primal, exact), (fd_primal, fd) = derivative('jvp', 0.0), derivative('finite_difference', 1e-4)
  np.testing.assert_allclose(primal, fd_primal, rtol=1e-5, atol=1e-6)
  assert np.linalg.norm(fd - exact) / np.linalg.norm(exact) < 1e-2
  coarse = derivative('finite_difference', 1e-2)[1]
  assert np.linalg.norm(coarse - exact) / np.linalg.norm(exact) > 1e-2


# ----------------------------------------------------------------------------------------------------------
# Gaussian oracle: exact F and exact teacher -> g ~ 0; a perturbed F gets a gradient pointing back.
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('a', [SD, 2 * SD])
def test_scd_tangent_vanishes_at_exact_consistency_function(a):
  model = TrigFlowOracle(a)
  objective = make_objective(_scm_config(), model)
  batch = {'image': a * jax.random.normal(jax.random.PRNGKey(0), (4096, 4))}
  teacher = {'alpha': 0.0, 'teacher': 1.0}

  def loss(alpha, step):
    return objective.loss({'alpha': alpha, 'teacher': 0.0}, {}, {'teacher': teacher}, batch,
                          jax.random.PRNGKey(1), step)

  grad = jax.jit(jax.grad(lambda al: loss(al, 20)[0]))
  _, metrics = jax.jit(loss)(0.0, 20)  # step 20 > H = 10: r = 1
  assert float(metrics['tangent_warmup']) == 1.0
  assert float(metrics['tangent_norm']) < 1e-4
  _, perturbed = jax.jit(loss)(0.05, 20)
  assert float(perturbed['tangent_norm']) > 1e-2 > 100 * float(metrics['tangent_norm'])
  g0, g_plus, g_minus = float(grad(0.0)), float(grad(0.05)), float(grad(-0.05))
  assert abs(g0) < 1e-3 * g_plus
  assert g_plus > 0 and g_minus < 0  # gradient descent moves alpha back to 0
  # During the warm-up (r < 1) the tangent is deliberately not the exact one.
  assert float(jax.jit(loss)(0.0, 5)[1]['tangent_norm']) > 1e-2


def test_sct_gradient_is_stationary_at_exact_consistency_function():
  """sCT's tangent uses the one-sample velocity cos(t) z - sin(t) x0, unbiased for E[dx_t/dt | x_t]: at f* only
  the expected gradient vanishes (the norm of g does not); perturbations get gradients pointing back."""
  model = TrigFlowOracle(2 * SD)
  objective = make_objective(_scm_config('sct', tangent_norm_c=1e6), model)  # c >> ||g||: normalisation ~ linear
  batch = {'image': 2 * SD * jax.random.normal(jax.random.PRNGKey(0), (65536, 4))}
  grad = jax.jit(jax.grad(lambda al: objective.loss({'alpha': al, 'teacher': 0.0}, {}, {}, batch,
                                                    jax.random.PRNGKey(1), 20)[0]))
  g0, g_plus, g_minus = float(grad(0.0)), float(grad(0.05)), float(grad(-0.05))
  assert g_plus > 0 and g_minus < 0
  assert abs(-g0 / ((g_plus - g_minus) / 0.1)) < 0.01, (g0, g_plus, g_minus)


# ----------------------------------------------------------------------------------------------------------
# Tangent warm-up and normalisation; the train step compiles once across the warm-up.
# ----------------------------------------------------------------------------------------------------------
def test_tangent_warmup_and_normalisation_bounds():
  r = [float(continuous.tangent_warmup(k, 4)) for k in (0, 1, 2, 4, 100)]
  assert r == [0.0, 0.25, 0.5, 1.0, 1.0]
  assert float(continuous.tangent_warmup(0, 0)) == 1.0
  g = jnp.asarray(np.random.default_rng(0).standard_normal((64, 10)) * np.logspace(-4, 4, 64)[:, None])
  for norm, reduce in (('l2', np.sum), ('rms', np.mean)):
    before = np.sqrt(reduce(np.asarray(g) ** 2, -1))
    after = np.sqrt(reduce(np.asarray(continuous.normalize_tangent(g, norm, 0.1)) ** 2, -1))
    assert np.all(after < 1.0)
    np.testing.assert_allclose(after, before / (before + 0.1), rtol=1e-5)
    assert after[-1] > 0.999 and after[0] < 1e-2  # large tangents -> unit norm, small ones ~ g / c


class ZeroNet(nn.Module):
  """F = 0: f_theta = f_theta- = 0, and the JVP of F- is 0."""

  @nn.compact
  def __call__(self, x_in, t, cond=None, train=False):
    return self.param('w', nn.initializers.zeros, ()) * x_in


@pytest.mark.parametrize('c, step, prior', [(1e-9, 20, True), (1e-9, 20, False), (1e4, 5, True), (1e4, 20, True)])
def test_sct_loss_in_closed_form_for_a_zero_network(c, step, prior):
  """F = 0 and x0 = 0: x_t = sin(t) z, dx_t/dt = cos(t) z, so g = -cos^2(t) (0 - dx_t/dt) - r (cos(t) sin(t) x_t + 0)
  = cos(t) (cos^2 t - r sin^2 t) z, and the loss is lambda(t) ||g / (||g|| + c)||^2 / D with lambda = 1 / (sd tan t)
  (prior weighting) or 1. With c << ||g|| that is lambda / D; with c >> ||g|| it is lambda ||g||^2 / (c^2 D), whose
  mean over z ~ N(0, sd^2 I) is lambda cos^2(t) (cos^2 t - r sin^2 t)^2 sd^2 / c^2. Here t = arctan(0.3 / sd) for
  every sample and r = min(1, step / 10)."""
  config = _scm_config('sct', p_mean=float(np.log(0.3)), p_std=1e-8, tangent_norm_c=c, prior_weighting=prior)
  objective = make_objective(config, ZeroNet())
  dim = 4
  loss = float(jax.jit(objective.loss)({'w': 0.0}, {}, {}, {'image': jnp.zeros((4096, dim))}, jax.random.PRNGKey(0),
                                      step)[0])
  t, r = np.arctan(0.3 / SD), min(1.0, step / 10)
  weight = 1.0 / (SD * np.tan(t)) if prior else 1.0
  if c < 1:
    np.testing.assert_allclose(loss, weight / dim, rtol=1e-4)
  else:
    expected = weight * np.cos(t) ** 2 * (np.cos(t) ** 2 - r * np.sin(t) ** 2) ** 2 * SD**2 / c**2
    np.testing.assert_allclose(loss, expected, rtol=0.03)


def _continuous_tiny(name, **objective):
  c = tiny_config(num_steps=6)
  if name in ('sct', 'scd', 'trigflow'):
    c.parameterization.name = 'trigflow'
    c.model.time_embedding, c.model.time_scale, c.model.adaptive_norm = 'positional', 1000.0, 'double'
  base = {'trigflow': dict(p_mean=-1.0, p_std=1.4), 'ct_continuous': dict(jvp='jvp', fd_eps=1e-3)}
  base['cd_continuous'] = base['ct_continuous']
  fields = base.get(name) or dict(_scm_config(name).objective)
  c.objective = ml_collections.ConfigDict(dict(fields, name=name, **objective))
  return c


def test_sct_train_step_compiles_once_across_warmup_and_trains_the_weighting():
  config = _continuous_tiny('sct', tangent_warmup_steps=4, adaptive_weighting=True)
  exp = experiment.Experiment(config, jax.devices()[:1])
  state, step_fn = exp.init_state(), exp.train_step()
  extra0 = jax.tree.map(np.asarray, state.extra)
  warmup = []
  with exp.batches(0) as batches:
    for _ in range(6):
      state, metrics = step_fn(state, next(batches), exp.frozen())
      warmup.append(float(metrics['tangent_warmup']))
      assert np.isfinite(float(metrics['loss']))
  assert warmup == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
  assert step_fn._cache_size() == 1
  assert not np.allclose(np.asarray(state.extra['dense']['kernel']), extra0['dense']['kernel'])


@pytest.mark.parametrize('name, options', [
    ('trigflow', {}), ('scd', {}), ('scd', dict(teacher='edm')), ('sct', dict(jvp='finite_difference')),
    ('ct_continuous', {}), ('cd_continuous', {})])
def test_new_objectives_give_finite_nonzero_gradients(name, options):
  config = _continuous_tiny(name, **options)
  model = build_model(config.model)
  objective = make_objective(config, model)
  x0 = jax.random.normal(jax.random.PRNGKey(0), (16, 2))
  params = model.init(jax.random.PRNGKey(1), x0, jnp.zeros(16))['params']
  params = jax.tree.map(lambda p: p + 0.05, params)  # the zero-initialised output layer moves off zero
  inputs = {'teacher': jax.tree.map(lambda p: p + 0.05, params)}
  grads, metrics = jax.jit(jax.grad(
      lambda p: objective.loss(p, objective.init_extra(jax.random.PRNGKey(2)), inputs, {'image': x0},
                               jax.random.PRNGKey(3), 2), has_aux=True))(params)
  norm = float(jnp.sqrt(sum(jnp.sum(g**2) for g in jax.tree.leaves(grads))))
  assert np.isfinite(float(metrics['loss'])) and np.isfinite(norm) and norm > 0


def _bf16_operand_convolutions(jaxpr) -> int:
  """Convolutions with a bfloat16 operand in a jaxpr, nested computations included."""
  count = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == 'conv_general_dilated' and any(v.aval.dtype == jnp.bfloat16 for v in eqn.invars):
      count += 1
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          count += _bf16_operand_convolutions(sub.jaxpr)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          count += _bf16_operand_convolutions(sub)
  return count


@pytest.mark.parametrize('name', ['sct', 'scd'])
def test_jvp_dtype_model_runs_the_jvp_in_the_network_dtype(name):
  """objective.jvp_dtype: 'float32' (default) JVPs a float32 clone, so only the trained forward/backward convolves
  in bfloat16; 'model' JVPs the bfloat16 network (more bfloat16 convolutions, the same loss up to bfloat16 rounding).
  On a float32 network both are the same program."""
  network = dict(name='ncsnpp', channels=8, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.0,
                 time_embedding='positional', time_scale=1000.0, adaptive_norm='double')
  x0 = jax.random.normal(jax.random.PRNGKey(0), (4, 8, 8, 3))
  params = build_model(network).init(jax.random.PRNGKey(1), x0, jnp.zeros(4))['params']
  params = jax.tree.map(lambda p: p + 0.02, params)

  def run(dtype, jvp_dtype):
    model = build_model(dict(network, dtype=dtype))
    objective = make_objective(_scm_config(name, jvp_dtype=jvp_dtype), model)
    loss = lambda p: objective.loss(p, {}, {'teacher': params}, {'image': x0}, jax.random.PRNGKey(3), 20)[0]
    return float(jax.jit(loss)(params)), _bf16_operand_convolutions(jax.make_jaxpr(jax.grad(loss))(params).jaxpr)

  (f32, _), (f32_model, _) = run('float32', 'float32'), run('float32', 'model')
  assert f32 == f32_model
  (mixed, mixed_convs), (low, low_convs) = run('bfloat16', 'float32'), run('bfloat16', 'model')
  assert low_convs > mixed_convs > 0
  assert low != mixed and low == pytest.approx(mixed, rel=0.05) and mixed == pytest.approx(f32, rel=0.05)


@pytest.mark.parametrize('name', ['sct', 'ct_continuous'])
def test_flash_attention_gives_the_loss_and_gradient_of_xla_attention(name, monkeypatch):
  """model.attention_kernel='flash' (Pallas, interpreted here): the trained pass differentiates the flash kernel's
  custom VJP and the objective's JVP runs the forward-mode kernel (attention.forward_mode); jax.jvp of the flash
  kernel itself would raise. Same loss and gradient as 'xla' attention, at 16x16 = 256 positions in 2 key blocks."""
  monkeypatch.setattr(attention, 'FLASH_MIN_LENGTH', {'flash': 128, 'flash_jvp': 128})
  monkeypatch.setattr(attention, 'FLASH_BLOCK', 128)
  network = dict(name='adm', channels=8, channel_mult=(1,), num_res_blocks=1, attn_resolutions=(16,), head_dim=8,
                 dropout=0.0, num_classes=0)
  x0 = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 16, 3))
  params = build_model(network).init(jax.random.PRNGKey(1), x0, jnp.zeros(2))['params']
  params = jax.tree.map(lambda p: p + 0.02, params)  # zero-initialised projections would hide the attention
  if name == 'sct':
    config = _scm_config('sct')
  else:
    config = ml_collections.ConfigDict(dict(
        objective=dict(name=name, jvp='jvp', fd_eps=1e-3), model=dict(num_classes=0),
        parameterization=dict(name='edm', sigma_data=0.5, sigma_min=0.002, sigma_max=80.0, rho=7.0)))

  def run(kernel):
    objective = make_objective(config, build_model(dict(network, attention_kernel=kernel)))
    loss = lambda p: objective.loss(p, {}, {}, {'image': x0}, jax.random.PRNGKey(3), 20)[0]
    return jax.jit(jax.value_and_grad(loss))(params)

  xla_loss, xla_grad = run('xla')
  with pltpu.force_tpu_interpret_mode():
    flash_loss, flash_grad = run('flash')
  np.testing.assert_allclose(flash_loss, xla_loss, rtol=1e-4)
  for got, want in zip(jax.tree.leaves(flash_grad), jax.tree.leaves(xla_grad)):
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=1e-6)


def test_trigflow_teacher_adaptive_weighting_is_exp_minus_w_loss_plus_w():
  """objective.adaptive_weighting on the TrigFlow teacher: per sample exp(-w(t)) L_t + w(t) with sCM's w_phi; with
  w = c constant the loss is exp(-c) L + c, and at w = 0 the weighting gets the gradient of sum (1 - L_t) dw."""
  config = _continuous_tiny('trigflow', adaptive_weighting=True)
  model = build_model(config.model)
  weighted, plain = make_objective(config, model), make_objective(_continuous_tiny('trigflow'), model)
  x0 = jax.random.normal(jax.random.PRNGKey(0), (16, 2))
  params = jax.tree.map(lambda p: p + 0.05, model.init(jax.random.PRNGKey(1), x0, jnp.zeros(16))['params'])
  extra = weighted.init_extra(jax.random.PRNGKey(2))
  assert plain.init_extra(jax.random.PRNGKey(2)) == {} and not np.any(np.asarray(extra['dense']['kernel']))
  loss = lambda objective, e: objective.loss(params, e, {}, {'image': x0}, jax.random.PRNGKey(3), 0)[0]
  base = float(loss(plain, {}))
  constant = {'dense': {'kernel': jnp.zeros_like(extra['dense']['kernel']), 'bias': jnp.full((1,), 0.7)}}
  np.testing.assert_allclose(float(loss(weighted, constant)), np.exp(-0.7) * base + 0.7, rtol=1e-5)
  np.testing.assert_allclose(float(loss(weighted, extra)), base, rtol=1e-6)
  grad = jax.grad(lambda e: loss(weighted, e))(extra)
  np.testing.assert_allclose(float(grad['dense']['bias'][0]), 1.0 - base, rtol=1e-4)


@pytest.mark.parametrize('name, change, key', [
    ('sct', dict(tangent_norm='l1'), 'objective.tangent_norm'),
    ('sct', dict(jvp='reverse'), 'objective.jvp'),
    ('sct', dict(jvp_dtype='float16'), 'objective.jvp_dtype'),
    ('sct', dict(bogus=1), 'unknown objective key'),
    ('ct_continuous', dict(bogus=1), 'unknown objective key'),
    ('ct_continuous', dict(weighting='sum'), 'objective.weighting'),
    ('scd', dict(teacher='vp'), 'objective.teacher'),
    ('scd', dict(guidance_scale=(1.0, 3.0)), 'objective.guidance_scale'),
])
def test_inconsistent_settings_raise_naming_the_key(name, change, key):
  with pytest.raises(ValueError, match=key):
    make_objective(_continuous_tiny(name, **change), build_model(dict(name='mlp', hidden=8, depth=1)))


def test_scm_needs_trigflow_and_scd_reads_a_trigflow_teacher():
  config = _continuous_tiny('sct')
  config.parameterization.name = 'edm'
  with pytest.raises(ValueError, match="parameterization.name='trigflow'"):
    make_objective(config, build_model(config.model))
  config = _continuous_tiny('scd')
  assert make_objective(config, build_model(config.model)).distils == 'trigflow'  # experiment.load_teacher checks the run


# ----------------------------------------------------------------------------------------------------------
# sCD with guidance: dx/dt from the guided teacher, s fed to a guidance-input student.
# ----------------------------------------------------------------------------------------------------------
PROBE_CALLS = []


class GuidanceProbe(nn.Module):
  """F = alpha x (1 + s) (s = 1 without a guidance scale); appends the guidance of every call to PROBE_CALLS. Declares
  itself class-conditional with label dropout (the unconditional branch guidance needs); it ignores labels."""
  guidance_embedding: bool = True
  num_classes: int = 3
  label_dropout: float = 0.1

  @nn.compact
  def __call__(self, x_in, t, cond=None, train=False, guidance=None):
    alpha = self.param('alpha', nn.initializers.ones, ())
    PROBE_CALLS.append(guidance)
    s = 1.0 if guidance is None else guidance.reshape((-1,) + (1,) * (x_in.ndim - 1))
    return alpha * x_in * (1.0 + s)


def _guided_scd_config(guidance_scale=(1.0, 3.0)):
  config = _scm_config(guidance_scale=guidance_scale)
  config.model = ml_collections.ConfigDict(dict(num_classes=3, label_dropout=0.1))
  return config


def test_scd_feeds_the_sampled_guidance_scale_to_the_student():
  """The student's F_theta and the JVP'd F_theta- get the same per-example s ~ U[1, 3]; the teacher (the network
  without the input) gets none. Two guidance ranges give different losses through the student alone."""
  objective = make_objective(_guided_scd_config(), GuidanceProbe())
  assert objective.feeds_guidance
  batch = {'image': jax.random.normal(jax.random.PRNGKey(0), (64, 4)), 'label': jnp.arange(64) % 3}
  PROBE_CALLS.clear()
  objective.loss({'alpha': 1.0}, {}, {'teacher': {'alpha': 1.0}}, batch, jax.random.PRNGKey(1), 5)
  fed = [g for g in PROBE_CALLS if g is not None]
  assert len(PROBE_CALLS) == 4 and len(fed) == 2  # teacher (label and null label), F_theta- (JVP), F_theta
  np.testing.assert_array_equal(fed[0], fed[1])
  assert fed[0].shape == (64,) and 1.0 <= float(jnp.min(fed[0])) < float(jnp.max(fed[0])) <= 3.0
  # The probe teacher ignores labels, so guidance does not change dx/dt: losses differ only through the student's s.
  losses = [float(make_objective(_guided_scd_config(r), GuidanceProbe()).loss(
      {'alpha': 1.0}, {}, {'teacher': {'alpha': 1.0}}, batch, jax.random.PRNGKey(1), 5)[0])
            for r in ((1.0, 1.5), (2.5, 3.0))]
  assert abs(losses[0] - losses[1]) > 1e-3 * abs(losses[0]), losses


def test_guided_scd_trains_on_digits_from_a_conditional_teacher():
  """configs/digits_scd.py:guided with a small MLP: three train steps on the 8x8 digits (10 classes) from a
  class-conditional TrigFlow teacher; finite losses, and the student's guidance layer learns (it starts at zero)."""
  shrink = lambda c: c.update_from_flattened_dict({'model.hidden': 32, 'model.depth': 1, 'train.batch_size': 16})
  config, teacher_config = digits_scd.get_config('guided'), digits_trigflow.get_config('cond')
  shrink(config), shrink(teacher_config)
  assert {k for k in config.model if config.model[k] != teacher_config.model[k]} == {'guidance_embedding'}
  exp = experiment.Experiment(config, jax.devices()[:1])
  teacher_model = build_model(teacher_config.model)
  teacher = teacher_model.init(jax.random.PRNGKey(1), jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,)),
                               jnp.zeros((1,), jnp.int32))['params']
  teacher = jax.tree.map(lambda p: p + 0.05, teacher)  # off the zero-initialised output layer
  state = exp.init_state()
  state = state.replace(params=init_from_teacher(state.params, jax.tree.map(jnp.copy, teacher)))  # state is donated
  kernel = lambda s: np.asarray(s.params['time_embed']['guidance']['kernel'])
  assert not np.any(kernel(state))
  step_fn = exp.train_step()
  with exp.batches(0) as batches:
    for _ in range(3):
      state, metrics = step_fn(state, next(batches), exp.frozen(teacher))
      assert np.isfinite(float(metrics['loss']))
  assert np.any(kernel(state))


@pytest.mark.parametrize('name, objective, guidance_input, key', [
    ('scd', dict(guidance_scale=(1.0, 3.0)), False, r'objective.guidance_scale=\(1.0, 3.0\).*guidance_embedding=True'),
    ('scd', dict(guidance_scale=(1.0, 1.0)), True, "model.guidance_embedding=True but objective.name='scd'"),
    ('scd', dict(guidance_scale=(2.0, 2.0)), True, "model.guidance_embedding=True but objective.name='scd'"),
    ('sct', {}, True, "model.guidance_embedding=True but objective.name='sct'"),
    ('trigflow', {}, True, "model.guidance_embedding=True but objective.name='trigflow'"),
])
def test_guidance_input_and_objective_must_agree(name, objective, guidance_input, key):
  """A sampled s the student cannot see, or a guidance input nothing feeds, stops with an error naming the keys."""
  config = _continuous_tiny(name, **objective)
  config.model.update(num_classes=8, label_dropout=0.1, guidance_embedding=guidance_input)
  with pytest.raises(ValueError, match=key):
    make_objective(config, build_model(config.model))


# ----------------------------------------------------------------------------------------------------------
# TrigFlow sampling on the oracle.
# ----------------------------------------------------------------------------------------------------------
def test_trigflow_samplers_reproduce_the_oracle_data_distribution():
  a = 2 * SD
  config = ml_collections.ConfigDict(dict(
      parameterization=dict(rho=7.0),
      sampling=dict(mid_sigmas=(SD * np.tan(1.1),), mid_indices=(), index_grid_size=18, guidance_scale=1.0)))
  model = TrigFlowOracle(a)
  shape = (8192, 4)
  for sampler, params, steps, tol in ((sampling.CONSISTENCY, 0.0, 1, 0.02), (sampling.CONSISTENCY, 0.0, 2, 0.02),
                                      (sampling.EDM_HEUN, 1.0, 40, 0.03)):
    fn = jax.jit(sampler.build(config, model, TF), static_argnames=('shape', 'num_steps'))
    x = fn({'alpha': 0.0, 'teacher': params}, jax.random.PRNGKey(0), None, shape=shape, num_steps=steps)
    assert abs(float(jnp.std(x)) / a - 1.0) < tol, (sampler.label(steps), float(jnp.std(x)))


# ----------------------------------------------------------------------------------------------------------
# The CM paper's continuous CT / CD: the limit of the scaled discrete gradients (float64).
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('distill', [False, True])
def test_cm_continuous_gradient_is_limit_of_discrete_gradient(distill):
  """(N - 1) grad L^N(discrete, squared l2) -> grad of the continuous pseudo-loss, error O(1/N)."""
  edm = EDM(sigma_data=SD)
  model = build_model(dict(name='mlp', hidden=16, depth=1, time_embedding='positional', time_scale=10.0))
  rng = np.random.default_rng(0)
  with jax.enable_x64(True):
    x0 = jnp.asarray(rng.standard_normal((8, 3)) * SD)
    z = jnp.asarray(rng.standard_normal((8, 3)))
    u = jnp.asarray(rng.uniform(0.3, 0.9, 8))
    init = model.init(jax.random.PRNGKey(0), x0, jnp.zeros(8))['params']
    perturb = lambda p, s: jax.tree.map(lambda q: jnp.asarray(q, jnp.float64) + 0.3 * jnp.asarray(
        np.random.default_rng(s).standard_normal(q.shape)), p)
    params, teacher_params = perturb(init, 1), perturb(init, 2)
    f = lambda p: lambda x, s: edm.consistency(lambda xi, c: model.apply({'params': p}, xi, c), x, s)
    denoise = lambda x, s: edm.denoise(lambda xi, c: model.apply({'params': teacher_params}, xi, c), x, s)
    sigma, dsigma_du = continuous.karras_continuous(u, edm.sigma_min, edm.sigma_max, 7.0)
    x = x0 + sigma[:, None] * z

    def continuous_loss(p):
      dx = solvers.pf_ode_derivative(denoise, x, sigma) if distill else z
      return jnp.mean(continuous.cm_pseudo_loss(f(p), f(jax.lax.stop_gradient(p)), x, sigma, dx, dsigma_du))

    def discrete_loss(p, n):
      sigma_n, _ = continuous.karras_continuous(u - 1.0 / (n - 1), edm.sigma_min, edm.sigma_max, 7.0)
      x_n = solvers.euler_step(denoise, x, sigma, sigma_n) if distill else x0 + sigma_n[:, None] * z
      target = jax.lax.stop_gradient(f(p)(x_n, sigma_n))
      return (n - 1) * jnp.mean(jnp.mean((f(p)(x, sigma) - target) ** 2, -1))

    flat = lambda g: jnp.concatenate([jnp.ravel(v) for v in jax.tree.leaves(g)])
    reference = flat(jax.jit(jax.grad(continuous_loss))(params))
    discrete_grad = jax.jit(jax.grad(discrete_loss))
    errors = [float(jnp.linalg.norm(flat(discrete_grad(params, float(n))) - reference) / jnp.linalg.norm(reference))
              for n in (101, 1001, 10001, 100001)]
  assert errors[-1] < 1e-3, errors
  for coarse, fine in zip(errors, errors[1:]):
    assert 5.0 < coarse / fine < 20.0, errors  # first order in 1/N


@pytest.mark.parametrize('weighting', ['paper', 'code'])
def test_cm_continuous_weighting_in_closed_form(weighting):
  """ct_continuous on the oracle f = k(sigma) x, k = c + a, c = sqrt(eps^2 + sd^2) / sqrt(sigma^2 + sd^2), a = 0.5
  (tests/oracle.py), x0 ~ N(0, sd^2 I): f^T df-/dsigma = k k' |x|^2 + k^2 x^T z has expectation D a (c + a) sigma
  (k' (sigma^2 + sd^2) = -c sigma). 'paper' weights a sample by 2 (dsigma/du) / D, so the loss is
  2 a int_eps^T (c + a) sigma dsigma = 2 a [sqrt(eps^2 + sd^2) (sqrt(T^2 + sd^2) - sqrt(eps^2 + sd^2)) + a (T^2 - eps^2)
  / 2] = 1639.75; 'code' by 1, so it is D a int_0^1 (c + a) sigma du on the Karras continuum sigma(u) = 13.53 (D = 4,
  midpoint rule). Monte Carlo standard error ~1%."""
  config = ml_collections.ConfigDict(dict(
      objective=dict(name='ct_continuous', jvp='jvp', fd_eps=1e-3, weighting=weighting), model=dict(num_classes=0),
      parameterization=dict(rho=7.0)))
  objective = continuous.make_cm_continuous(config, OracleNet(), EDM_, distill=False)
  batch = {'image': SD * jax.random.normal(jax.random.PRNGKey(0), (65536, 4))}
  loss = float(jax.jit(objective.loss)({'a': 0.5, 'gate': 1.0}, {}, {}, batch, jax.random.PRNGKey(1), 0)[0])
  a, c_eps = 0.5, np.sqrt(EPS**2 + SD**2)
  if weighting == 'paper':
    expected = 2 * a * (c_eps * (np.sqrt(T**2 + SD**2) - c_eps) + a * (T**2 - EPS**2) / 2)
  else:
    u = (np.arange(100_000) + 0.5) / 100_000
    sigma = (EPS ** (1 / 7) + u * (T ** (1 / 7) - EPS ** (1 / 7))) ** 7
    expected = 4 * a * np.mean((c_eps / np.sqrt(sigma**2 + SD**2) + a) * sigma)
  np.testing.assert_allclose(loss, expected, rtol=0.05)
