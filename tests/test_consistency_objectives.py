"""CD, CT and ECT on the Gaussian oracle (tests/oracle.py), ECT's r(t) and stages, multistep sampling times."""

import importlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from cm_jax import models
from cm_jax import objectives
from cm_jax import sampling
from cm_jax import schedules
from cm_jax.objectives.discrete import make_cd, make_ct, teacher_ode_step
from cm_jax.objectives.ect import make_ect
from oracle import EDM_, EPS, SD, T, OracleNet
from test_cli import _assert_one_clear_error, run_main

MODEL = OracleNet()
EXACT_TEACHER = {'a': jnp.float32(0.0), 'gate': jnp.float32(0.0)}  # F = 0: D = D* under the denoiser scalings


def student(a):
  """f = f* + a x under the consistency scalings."""
  return {'a': jnp.float32(a), 'gate': jnp.float32(1.0)}


def _config(objective, **sampling_keys):
  return ml_collections.ConfigDict(dict(
      objective=objectives.objective_config(**objective) if objective else {}, parameterization=dict(rho=7.0),
      teacher=dict(workdir='teacher_run', init=False),
      model=dict(num_classes=0), train=dict(num_steps=800_000),
      sampling=dict(dict(mid_sigmas=(), mid_indices=(), index_grid_size=18, guidance_scale=1.0), **sampling_keys)))


def _cd_config(num_scales=160, solver='heun', target_ema=0.0):
  return _config(dict(name='cd', num_scales=num_scales, solver=solver, target_ema=target_ema, distance='l2'))


def _gaussian_batch(n, dim, seed=0):
  return {'image': SD * jax.random.normal(jax.random.PRNGKey(seed), (n, dim))}


# ---------------------------------------------------------------------------------------------------------
# Consistency distillation.
# ---------------------------------------------------------------------------------------------------------
def test_heun_distillation_target_is_the_exact_ode_solution():
  """One Heun step of the exact teacher between adjacent levels of a 160-point grid matches
  x(sigma_n) = x(sigma_{n+1}) sqrt(sigma_n^2 + sd^2) / sqrt(sigma_{n+1}^2 + sd^2) to 1e-4 (Euler: only 1e-3)."""
  grid = schedules.karras_sigmas(160)
  sigma, sigma_next = grid[:-1], grid[1:]
  x_next = sigma_next[:, None] * jax.random.normal(jax.random.PRNGKey(0), (159, 4))
  exact = x_next * jnp.sqrt(sigma[:, None] ** 2 + SD**2) / jnp.sqrt(sigma_next[:, None] ** 2 + SD**2)
  teacher = lambda x, c: MODEL.apply({'params': EXACT_TEACHER}, x, c)
  error = {s: float(jnp.max(jnp.abs(teacher_ode_step(s, EDM_, teacher, x_next, sigma_next, sigma) / exact - 1.0)))
           for s in ('heun', 'euler')}
  assert error['heun'] < 1e-4, error
  assert error['euler'] > 10 * error['heun'], error


def test_cd_loss_of_exact_consistency_function_is_zero():
  """Exact teacher, Heun, N = 160: the loss of f* is ~1e-11 while f* + 0.05 x gets ~2e-3; Euler's error shows."""
  batch = _gaussian_batch(4096, 4)
  inputs = {'target': None, 'teacher': EXACT_TEACHER}

  def loss(solver, a):
    objective = make_cd(_cd_config(solver=solver), MODEL, EDM_)
    return float(objective.loss(student(a), {}, inputs, batch, jax.random.PRNGKey(1), 0)[0])

  exact = loss('heun', 0.0)
  assert exact < 1e-9
  assert loss('heun', 0.05) > 1e5 * exact
  assert loss('euler', 0.0) > 100 * exact


def test_cd_target_ema():
  """mu = 0 keeps no target (theta- = sg(theta)); mu > 0 reads theta- from inputs['target'] at rate mu."""
  batch = _gaussian_batch(1024, 4)
  assert make_cd(_cd_config(), MODEL, EDM_).target_rate is None
  objective = make_cd(_cd_config(target_ema=0.95), MODEL, EDM_)
  assert float(objective.target_rate(123)) == pytest.approx(0.95)
  loss = lambda target: float(objective.loss(student(0.0), {}, {'target': target, 'teacher': EXACT_TEACHER}, batch,
                                             jax.random.PRNGKey(1), 0)[0])
  assert loss(student(0.0)) < 1e-9
  assert loss(student(0.05)) > 1e-4


@pytest.mark.parametrize('key, value, message', [
    ('objective.solver', 'rk4', 'objective.solver'),
    ('objective.target_ema', 1.0, 'objective.target_ema'), ('objective.num_scales', 1, 'objective.num_scales')])
def test_cd_rejects_bad_config(key, value, message):
  config = _cd_config()
  section, field = key.split('.')
  config[section][field] = value
  with pytest.raises(ValueError, match=message):
    make_cd(config, MODEL, EDM_)


# ---------------------------------------------------------------------------------------------------------
# Consistency training.
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('convention, divisor', [('paper', lambda n: n), ('code', lambda n: n - 1)])
def test_ct_target_rate_follows_num_scales(convention, divisor):
  """mu(k) = exp(s0 ln mu0 / N(k)) ('paper') or / (N(k) - 1) ('code'); K = 800k, s0 = 2, s1 = 150, mu0 = 0.9."""
  objective = make_ct(_config(dict(name='ct', s0=2, s1=150, mu0=0.9, mu_convention=convention, distance='l2')),
                      MODEL, EDM_)
  for k, n in ((0, 2), (8_000, 16), (800_000, 151)):
    np.testing.assert_allclose(objective.target_rate(k), np.exp(2 * np.log(0.9) / divisor(n)), rtol=1e-6)
  assert float(objective.target_rate(0)) == pytest.approx({'paper': 0.9, 'code': 0.81}[convention])


def test_ct_gradient_vanishes_at_exact_consistency_function():
  """With theta- = f* (the EMA target), CT's expected gradient at f* vanishes; perturbations get restoring ones."""
  config = _config(dict(name='ct', s0=150, s1=150, mu0=0.9, mu_convention='paper', distance='l2'))
  objective = make_ct(config, MODEL, EDM_)
  batch = _gaussian_batch(8192, 4)
  inputs = {'target': student(0.0), 'teacher': None}
  grad = jax.jit(jax.grad(lambda a: objective.loss(dict(student(0.0), a=a), {}, inputs, batch,
                                                   jax.random.PRNGKey(1), 0)[0]))
  g0, g_plus, g_minus = float(grad(0.0)), float(grad(0.05)), float(grad(-0.05))
  assert g_plus > 0 and g_minus < 0
  assert abs(g0 / ((g_plus - g_minus) / 0.1)) < 0.01, (g0, g_plus, g_minus)


def test_ct_rejects_unknown_mu_convention():
  with pytest.raises(ValueError, match='objective.mu_convention'):
    make_ct(_config(dict(name='ct', s0=2, s1=150, mu0=0.9, mu_convention='other', distance='l2')), MODEL, EDM_)


# ---------------------------------------------------------------------------------------------------------
# Easy consistency tuning.
# ---------------------------------------------------------------------------------------------------------
def test_ect_r_values_and_stages():
  """r = max(t (1 - q^-(stage+1) (1 + 8 sigmoid(-t))), 0), stage = floor(k / stage_steps)."""
  t = jnp.array([0.5, 1.5, 5.0, 40.0])
  sig = 1.0 / (1.0 + np.exp(np.asarray(t)))
  for step, stage in ((0, 0), (999, 0), (1000, 1), (4500, 4)):
    assert int(schedules.ect_stage(step, 1000)) == stage
    expected = np.maximum(np.asarray(t) * (1.0 - 2.0 ** -(stage + 1) * (1.0 + 8.0 * sig)), 0.0)
    np.testing.assert_allclose(schedules.ect_r(t, step, 1000, 2.0), expected, rtol=1e-5, atol=1e-7)
  # Stage 0 with q = 2: r = 0 (the data) below t = ln 7, where 1 + 8 sigmoid(-t) = 2; here 0.5 -> 0, 5 -> 2.366.
  np.testing.assert_allclose(schedules.ect_r(t, 0, 1000, 2.0)[:3], [0.0, 0.0, 5 * (1 - 0.5 * (1 + 8 * sig[2]))],
                             rtol=1e-5)
  # r -> t as stages advance; q = 4 gets there faster than q = 2.
  gap = lambda step, q: np.asarray(t - schedules.ect_r(t, step, 1000, q))
  assert np.all(gap(10_000, 2.0) < gap(3000, 2.0)) and np.all(gap(3000, 4.0) < gap(3000, 2.0))
  assert np.all(gap(20_000, 2.0) > 0) and np.all(gap(20_000, 2.0) < 1e-5 * np.asarray(t))


def _ect_config(weighting='inverse_delta', t=0.5):
  """ln t ~ N(ln 0.5, 1e-8): every sample at t = 0.5 (r = 0 at stage 0, r = 0.4375 at stage 4)."""
  return _config(dict(name='ect', p_mean=float(np.log(t)), p_std=1e-8, q=2.0, stage_steps=100,
                      distance='l2_norm', weighting=weighting))


def test_ect_loss_targets_data_then_f_at_r():
  """x0 = 0, t = 0.5, the network is the exact denoiser D* (ECT trains EDM's unshifted denoiser, official ECMLoss),
  ||z|| ~ sqrt(D): stage 0 has r = 0, target x0, loss ||D*(t z, t)|| / t = c(t) ||z||; stage 4 has r = 0.4375 and
  loss ||z|| |t c(t) - r c(r)| / (t - r), c(s) = sd^2 / (s^2 + sd^2)."""
  dim = 4096
  batch = {'image': jnp.zeros((16, dim))}
  c = lambda s: SD**2 / (s**2 + SD**2)
  loss = lambda config, step: float(make_ect(config, MODEL, EDM_).loss(
      EXACT_TEACHER, {}, {'target': None, 'teacher': None}, batch, jax.random.PRNGKey(0), step)[0])
  np.testing.assert_allclose(loss(_ect_config(), 0), c(0.5) * np.sqrt(dim), rtol=0.02)
  r = 0.5 * (1 - 2.0**-5 * (1 + 8 / (1 + np.exp(0.5))))
  np.testing.assert_allclose(loss(_ect_config(), 400), np.sqrt(dim) * abs(0.5 * c(0.5) - r * c(r)) / (0.5 - r),
                             rtol=0.02)
  # The ImageNet weighting (t^2 + sd^2) / (t sd)^2 instead of 1 / (t - r) = 1 / t at stage 0: a factor 4 here.
  np.testing.assert_allclose(loss(_ect_config('edm'), 0) / loss(_ect_config(), 0), 4.0, rtol=1e-4)


@pytest.mark.parametrize('field, value', [('distance', 'l2'), ('weighting', 'sqrt'), ('q', 1.0)])
def test_ect_rejects_bad_config(field, value):
  config = _ect_config()
  config.objective[field] = value
  with pytest.raises(ValueError, match=f'objective.{field}'):
    make_ect(config, MODEL, EDM_)


# ---------------------------------------------------------------------------------------------------------
# Multistep sampling.
# ---------------------------------------------------------------------------------------------------------
def test_mid_indices_are_the_cm_codes_ts():
  """ts = [0, 11, 17] on the 18-point grid: sigma = (T^(1/7) + 11/17 (eps^(1/7) - T^(1/7)))^7 = 0.5853."""
  expected = (T ** (1 / 7) + 11 / 17 * (EPS ** (1 / 7) - T ** (1 / 7))) ** 7
  assert sampling.mid_sigmas(_config({}, mid_indices=(11,)), EDM_) == pytest.approx((expected,), rel=1e-5)
  assert sampling.mid_sigmas(_config({}, mid_sigmas=(0.821,)), EDM_) == (0.821,)
  with pytest.raises(ValueError, match='not both'):
    sampling.mid_sigmas(_config({}, mid_indices=(11,), mid_sigmas=(0.821,)), EDM_)
  for bad in ((0,), (17,), (11, 5)):
    with pytest.raises(ValueError, match='sampling.mid_indices'):
      sampling.mid_sigmas(_config({}, mid_indices=bad), EDM_)


@pytest.mark.parametrize('num_steps', [1, 2, 3])
def test_multistep_sampling_of_exact_consistency_function_has_data_variance(num_steps):
  """f* maps N(0, (sd^2 + tau^2) I) to N(0, (sd^2 + eps^2) I) at every step; f* + 0.05 x does not."""
  config = _config({}, mid_indices=(8, 11))
  sample = jax.jit(sampling.CONSISTENCY.build(config, MODEL, EDM_), static_argnames=('shape', 'num_steps'))
  var = lambda a: float(jnp.var(sample(student(a), jax.random.PRNGKey(0), None, shape=(4096, 16),
                                       num_steps=num_steps)))
  np.testing.assert_allclose(var(0.0), SD**2 + EPS**2, rtol=0.03)
  assert abs(var(0.05) / (SD**2 + EPS**2) - 1.0) > 0.1


# ---------------------------------------------------------------------------------------------------------
# The digits configs.
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('name, target', [('cd', False), ('ct', True), ('ect', False)])
def test_digits_configs_build_their_objective(name, target):
  """Each config builds its consistency objective (CD with a teacher run set); CT keeps an EMA target."""
  config = importlib.import_module(f'configs.digits_{name}').get_config()
  config.teacher.workdir = 'runs/digits_edm'
  objective = objectives.make_objective(config, MODEL)
  assert objective.sampler is sampling.CONSISTENCY and (objective.target_rate is not None) == target
  assert config.teacher.init == (name != 'ct')  # CT starts from random parameters; CD and ECT from the teacher
  assert len(sampling.mid_sigmas(config, EDM_)) == 1


def test_cd_without_teacher_stops_with_one_clear_error(tmp_path):
  result = run_main('--config=configs/digits_cd.py', f'--workdir={tmp_path}')
  _assert_one_clear_error(result, 'teacher.workdir')
  assert not (tmp_path / 'checkpoints').exists()


def test_a_distillation_student_sees_every_label():
  """model.label_dropout is the teacher's setting: the CD student keeps every label (its loss equals the loss without
  label dropout), while a non-distilling objective on the same network does drop labels."""
  model = models.build_model(dict(name='mlp', hidden=16, depth=1, num_classes=3, label_dropout=0.9))
  x0 = jax.random.normal(jax.random.PRNGKey(0), (32, 2))
  batch = {'image': x0, 'label': jnp.arange(32) % 3}
  params = model.init(jax.random.PRNGKey(1), x0, jnp.zeros(32), batch['label'])['params']
  params = jax.tree.map(lambda p: p + 0.1, params)
  config = _cd_config(num_scales=18)
  config.model.num_classes = 3
  inputs = {'teacher': params, 'target': None}
  loss = lambda m, make: float(make(config, m, EDM_).loss(params, {}, inputs, batch, jax.random.PRNGKey(2), 5)[0])
  assert loss(model, make_cd) == loss(model.clone(label_dropout=0.0), make_cd)
  config.objective = ml_collections.ConfigDict(dict(
      name='ect', p_mean=-1.1, p_std=2.0, q=2.0, stage_steps=10, distance='l2_norm', weighting='inverse_delta'))
  assert loss(model, make_ect) != loss(model.clone(label_dropout=0.0), make_ect)
