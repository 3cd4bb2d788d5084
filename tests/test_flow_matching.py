"""Flow matching and MeanFlow on z_t = (1 - t) x + t e, checked against a Gaussian oracle computed here in numpy.

Oracle: data x ~ N(mu, s^2) per dimension, e ~ N(0, 1), z_t = (1 - t) x + t e, so z_t ~ N(m_t, V_t) with
  m_t = (1 - t) mu,  V_t = (1 - t)^2 s^2 + t^2,  Cov(e - x, z_t) = t - (1 - t) s^2, and the marginal velocity
  v(z, t) = E[e - x | z_t = z] = -mu + (t - (1 - t) s^2) / V_t (z - m_t)   (linear in z).
Its ODE flow is affine and keeps the Gaussian: z_r(z_t) = m_r + sqrt(V_r / V_t) (z_t - m_t) (d/dt of this is v), so
the exact average velocity over [r, t] is u(z, r, t) = (z - z_r(z)) / (t - r) (u(z, t, t) = v(z, t)), and one step
z_1 - u(z_1, 0, 1) = mu + s z_1 is exactly the data distribution.
mu != 0 and s != 1 so that a dropped mean, a wrong scale or a missing factor shows.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from cm_jax import experiment
from cm_jax import sampling
from cm_jax.models import build_model
from cm_jax.objectives import make_objective, meanflow
from cm_jax.parameterization import FlowMatching
from configs import digits_flow_matching, digits_meanflow
from helpers import tiny_config

MU, S = 0.7, 0.4
FM = FlowMatching()


def np_stats(t):
  return (1 - t) * MU, (1 - t) ** 2 * S**2 + t**2


def np_velocity(z, t):
  m, var = np_stats(t)
  return -MU + (t - (1 - t) * S**2) / var * (z - m)


def np_flow(z, r, t):
  """z_r along the ODE from z_t."""
  (m_t, v_t), (m_r, v_r) = np_stats(t), np_stats(r)
  return m_r + np.sqrt(v_r / v_t) * (z - m_t)


def np_average_velocity(z, r, t):
  return (z - np_flow(z, r, t)) / (t - r)


def _bc(a):
  return a[:, None]


def jax_average_velocity(z, r, t):
  """The same u in a form without the 0/0 at r = t: (V_t - V_r)/(t - r) = (t + r) - (2 - t - r) s^2."""
  m_t, v_t = (1 - t) * MU, (1 - t) ** 2 * S**2 + t**2
  v_r = (1 - r) ** 2 * S**2 + r**2
  k = jnp.sqrt(v_r / v_t)
  slope = ((t + r) - (2 - t - r) * S**2) / (v_t * (1 + k))
  return -MU + _bc(slope) * (z - _bc(m_t))


class OracleVelocity(nn.Module):
  """F(z, c_noise = t) = v*(z, t) + a z: the exact marginal velocity at a = 0."""

  @nn.compact
  def __call__(self, z, c_noise, cond=None, train=False):
    a = self.param('a', nn.initializers.zeros, ())
    t = c_noise
    m, var = (1 - t) * MU, (1 - t) ** 2 * S**2 + t**2
    return -MU + _bc((t - (1 - t) * S**2) / var) * (z - _bc(m)) + a * z


class OracleAverageVelocity(nn.Module):
  """u(z, r, t) = u*(z, r, t) + a z with t = c_noise and r = t - interval: the exact average velocity at a = 0."""
  second_time: bool = True

  @nn.compact
  def __call__(self, z, c_noise, cond=None, train=False, interval=None):
    a = self.param('a', nn.initializers.zeros, ())
    t = c_noise
    r = t if interval is None else t - interval
    return jax_average_velocity(z, r, t) + a * z


def _config(name, **objective):
  fields = {'flow_matching': dict(p_mean=-0.4, p_std=1.0),
            'meanflow': dict(p_mean=-0.4, p_std=1.0, flow_share=0.75, norm_p=1.0, norm_c=1e-3),
            'imeanflow': dict(p_mean=-0.4, p_std=1.0, flow_share=0.5, norm_p=1.0, norm_c=1e-2)}[name]
  return ml_collections.ConfigDict(dict(objective=dict(fields, name=name, **objective), model=dict(num_classes=0),
                                        parameterization=dict(name='flow_matching')))


def _data(n=20_000, d=4, seed=0):
  return jnp.asarray(MU + S * np.random.default_rng(seed).standard_normal((n, d)), jnp.float32)


def test_oracle_velocity_is_the_derivative_of_its_flow():
  """The numpy oracle itself: d z_r / dr = v(z_r, r) (central difference) and u -> v as r -> t."""
  z, r, t = np.array([-1.3, 0.2, 1.1]), 0.35, 0.8
  h = 1e-6
  d = (np_flow(z, r + h, t) - np_flow(z, r - h, t)) / (2 * h)
  np.testing.assert_allclose(d, np_velocity(np_flow(z, r, t), r), rtol=1e-6)
  np.testing.assert_allclose(np_average_velocity(z, t - 1e-7, t), np_velocity(z, t), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(jax_average_velocity(jnp.asarray(z)[None], jnp.asarray([r]), jnp.asarray([t]))[0]),
                             np_average_velocity(z, r, t), rtol=1e-5)


def test_flow_matching_process_and_logit_normal_times():
  x, e, t = jnp.full((3, 2), 0.5), jnp.full((3, 2), -2.0), jnp.asarray([0.0, 0.25, 1.0])
  np.testing.assert_allclose(FM.noise(x, e, t)[:, 0], [0.5, 0.5 * 0.75 - 2.0 * 0.25, -2.0])
  np.testing.assert_allclose(FM.target_velocity(x, e), -2.5)
  ts = np.asarray(FM.sample_t(jax.random.PRNGKey(0), (200_000,), -0.4, 1.0))
  logits = np.log(ts / (1 - ts))
  assert 0 < ts.min() and ts.max() < 1
  assert abs(logits.mean() + 0.4) < 0.01 and abs(logits.std() - 1.0) < 0.01


def test_flow_matching_loss_is_stationary_at_the_exact_velocity():
  """d/da E||v* + a z - (e - x)||^2 = 0 at a = 0 (v* = E[e - x | z]), and clearly not at a = 0.3; the loss grows."""
  objective = make_objective(_config('flow_matching'), OracleVelocity())
  batch = {'image': _data()}
  loss = lambda a: objective.loss({'a': a}, {}, {}, batch, jax.random.PRNGKey(1), 0)[0]
  grad = jax.jit(jax.grad(loss))
  g0, g1 = float(grad(0.0)), float(grad(0.3))
  assert abs(g0) < 0.03 * abs(g1)
  assert float(loss(0.0)) < float(loss(0.1)) and float(loss(0.0)) < float(loss(-0.1))


def test_meanflow_target_at_the_exact_average_velocity_is_the_exact_average_velocity():
  """u_tgt = v - (t - r) du/dt from the objective's jax.jvp, at the oracle u and the sample's v = e - x, averaged over
  the (x, e) that share z_t, equals u*; at a single sample it equals u* + (v - v*), so compare with the marginal v*."""
  rng = np.random.default_rng(3)
  z = jnp.asarray(rng.standard_normal((5, 3)), jnp.float32)
  t = jnp.asarray([0.9, 0.6, 0.5, 0.7, 0.3])
  r = jnp.asarray([0.1, 0.6, 0.2, 0.0, 0.05])
  v = jnp.asarray(np_velocity(np.asarray(z), np.asarray(t)[:, None]), jnp.float32)  # the marginal velocity
  u, dudt, u_tgt = meanflow.meanflow_target(jax_average_velocity, z, r, t, v)
  zn, rn, tn = np.asarray(z, np.float64), np.asarray(r, np.float64), np.asarray(t, np.float64)
  exact = np.stack([np_velocity(zn[i], tn[i]) if rn[i] == tn[i] else np_average_velocity(zn[i], rn[i], tn[i])
                    for i in range(len(tn))])
  np.testing.assert_allclose(np.asarray(u), exact, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.asarray(u_tgt), exact, rtol=1e-4, atol=1e-5)
  # The mutants a test must catch: a wrong sign, a missing (t - r) factor (every row with r != t is off by > 0.05).
  gap = lambda a: np.linalg.norm(np.asarray(a) - exact, axis=-1)[rn != tn].min()
  assert gap(v + (t - r)[:, None] * dudt) > 5e-2
  assert gap(v - dudt) > 5e-2


def test_meanflow_loss_is_zero_at_the_exact_average_velocity_and_grows_off_it():
  """With the marginal v the target would be u* exactly; with the sample's v = e - x the delta is the (zero-mean)
  v - v*, so the loss at u* is its minimum over a: d loss / d a ~ 0 at a = 0, and the loss is larger at a = +-0.1."""
  config = _config('meanflow', norm_p=0.0)  # plain MSE: its minimiser is the conditional mean
  objective = make_objective(config, OracleAverageVelocity())
  batch = {'image': _data()}
  loss = lambda a: objective.loss({'a': a}, {}, {}, batch, jax.random.PRNGKey(2), 0)[0]
  grad = jax.jit(jax.grad(loss))
  assert abs(float(grad(0.0))) < 0.03 * abs(float(grad(0.3)))
  assert float(loss(0.0)) < float(loss(0.1)) and float(loss(0.0)) < float(loss(-0.1))


def test_meanflow_dudt_from_jvp_matches_float64_central_difference_on_the_mlp():
  model = build_model(dict(name='mlp', hidden=32, depth=2, time_embedding='fourier', time_scale=16.0,
                           second_time=True))
  rng = np.random.default_rng(0)
  z = jnp.asarray(rng.standard_normal((3, 6)), jnp.float32)
  v = jnp.asarray(rng.standard_normal((3, 6)), jnp.float32)
  t, r = jnp.asarray([0.9, 0.5, 0.3]), jnp.asarray([0.2, 0.5, 0.0])
  params = model.init(jax.random.PRNGKey(0), z, t)['params']
  params = jax.tree.map(lambda p: p + 0.1 * jnp.asarray(rng.standard_normal(p.shape), p.dtype), params)
  u_fn = lambda p: (lambda z, r, t: model.apply({'params': p}, z, t, interval=t - r))
  _, dudt, _ = jax.jit(lambda: meanflow.meanflow_target(u_fn(params), z, r, t, v))()
  with jax.enable_x64(True):
    p64 = jax.tree.map(lambda p: jnp.asarray(p, jnp.float64), params)
    z64, v64, r64, t64 = (jnp.asarray(a, jnp.float64) for a in (z, v, r, t))
    f = jax.jit(lambda h: u_fn(p64)(z64 + h * v64, r64, t64 + h))  # r fixed: the tangent (v, 0, 1)
    reference = np.asarray((f(1e-6) - f(-1e-6)) / 2e-6)
  scale = np.linalg.norm(reference)
  assert scale > 0.1
  assert np.linalg.norm(np.asarray(dudt) - reference) / scale < 1e-3


def test_t_r_sampler_orders_the_times_and_keeps_the_flow_share():
  t, r = meanflow.sample_t_r(jax.random.PRNGKey(0), 100_000, -0.4, 1.0, 0.75)
  t, r = np.asarray(t), np.asarray(r)
  assert (r <= t).all() and (0 < r).all() and (t < 1).all()
  assert abs(np.mean(r == t) - 0.75) < 0.01
  # Among r != t: the min and max of two independent logit-normal draws.
  a = np.log(r[r < t] / (1 - r[r < t]))
  assert abs(a.mean() - (-0.4 - 1.0 / np.sqrt(np.pi))) < 0.02
  t0, r0 = meanflow.sample_t_r(jax.random.PRNGKey(1), 1000, -0.4, 1.0, 0.0)
  assert np.mean(np.asarray(r0) == np.asarray(t0)) == 0.0


def test_adaptive_weight_by_hand_and_in_the_loss():
  sq = jnp.asarray([0.0, 1.0, 4.0])
  np.testing.assert_allclose(meanflow.adaptive_weight(sq, 1.0, 1e-3), [1e3, 1 / 1.001, 1 / 4.001], rtol=1e-6)
  np.testing.assert_allclose(meanflow.adaptive_weight(sq, 0.5, 0.01), [10.0, 1.01**-0.5, 4.01**-0.5], rtol=1e-6)
  assert jax.grad(lambda s: meanflow.adaptive_weight(s, 1.0, 1e-3).sum())(sq).tolist() == [0.0, 0.0, 0.0]
  # The objective: loss = mean(||delta||^2 / (||delta||^2 + c)) for a network u = a z off the oracle (p = 1).
  objective = make_objective(_config('meanflow', norm_c=0.5), OracleAverageVelocity())
  batch = {'image': _data(64)}
  value, metrics = objective.loss({'a': 0.5}, {}, {}, batch, jax.random.PRNGKey(4), 0)
  assert 0 < float(value) < 1 and float(metrics['adaptive_weight']) > 0


def test_one_step_sampling_with_the_exact_average_velocity_gives_the_data_moments():
  objective = make_objective(_config('meanflow'), OracleAverageVelocity())
  assert objective.sampler is sampling.MEANFLOW
  sample = objective.sampler.build(_config('meanflow'), OracleAverageVelocity(), FM)
  for steps in (1, 2):
    x = np.asarray(sample({'a': 0.0}, jax.random.PRNGKey(5), None, (50_000, 2), steps))
    assert abs(x.mean() - MU) < 0.01 and abs(x.std() - S) < 0.01, steps


@pytest.mark.parametrize('solver, steps, tol', [('euler', 100, 0.01), ('heun', 20, 0.01)])
def test_flow_ode_sampler_with_the_exact_velocity_gives_the_data_moments(solver, steps, tol):
  config = _config('flow_matching')
  config.sampling = dict(flow_solver=solver, teacher_steps=steps)
  sample = sampling.FLOW_ODE.build(config, OracleVelocity(), FM)
  x = np.asarray(sample({'a': 0.0}, jax.random.PRNGKey(6), None, (50_000, 2), steps))
  assert abs(x.mean() - MU) < tol and abs(x.std() - S) < tol
  assert sampling.FLOW_ODE.nfe(config, steps) == steps * (2 if solver == 'heun' else 1)


@pytest.mark.parametrize('name', ['flow_matching', 'meanflow', 'imeanflow'])
def test_train_steps_run_through_the_trainer(name):
  c = tiny_config(num_steps=3)
  c.parameterization = ml_collections.ConfigDict(dict(name='flow_matching'))
  c.objective = _config(name).objective
  c.model.second_time = name != 'flow_matching'
  exp = experiment.Experiment(c, jax.devices()[:1])
  state, step_fn = exp.init_state(), exp.train_step()
  with exp.batches(0) as batches:
    for _ in range(3):
      state, metrics = step_fn(state, next(batches), exp.frozen())
      assert np.isfinite(float(metrics['loss']))
  x = exp.sampler.build(c, exp.model, exp.process)(state.params, jax.random.PRNGKey(0), None, (4, 2), 2)
  assert x.shape == (4, 2) and np.isfinite(np.asarray(x)).all()


def test_bad_settings_raise_naming_the_option():
  with pytest.raises(ValueError, match='model.second_time=True'):
    make_objective(_config('meanflow'), build_model(dict(name='mlp', hidden=8, depth=1)))
  with pytest.raises(ValueError, match='second_time=False'):
    make_objective(_config('flow_matching'), build_model(dict(name='mlp', hidden=8, depth=1, second_time=True)))
  with pytest.raises(ValueError, match='flow_share'):
    make_objective(_config('meanflow', flow_share=1.5), OracleAverageVelocity())
  bad = _config('meanflow')
  bad.parameterization = dict(name='edm', sigma_data=0.5, sigma_min=0.002, sigma_max=80.0)
  with pytest.raises(ValueError, match="parameterization.name='flow_matching'"):
    make_objective(bad, OracleAverageVelocity())
  with pytest.raises(ValueError, match='unknown objective key'):
    make_objective(_config('flow_matching', flow_share=0.5), OracleVelocity())


def test_digits_configs_build():
  for module in (digits_flow_matching, digits_meanflow):
    config = module.get_config()
    experiment.check_config(config)
    make_objective(config, build_model(config.model))
