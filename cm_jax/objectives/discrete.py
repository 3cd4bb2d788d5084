"""Discrete-time consistency models: distillation (CD) and training (CT) of the CM paper, and improved CT (iCT).

All three minimise lambda(sigma_n) d(f_theta(x_{n+1}, sigma_{n+1}), f_theta-(x_hat_n, sigma_n)) with
x_{n+1} = x0 + sigma_{n+1} z and one dropout key shared by both calls; they differ in how n is drawn, in
x_hat_n (CD: one teacher ODE step from x_{n+1}; CT and iCT: x0 + sigma_n z with the same z), in lambda and in
theta- (an EMA target when target_rate is set, else sg(theta)).
"""

import dataclasses

import jax
import jax.numpy as jnp

from cm_jax import distances
from cm_jax import schedules
from cm_jax import solvers
from cm_jax.objectives.base import Objective, labels, network, without_label_dropout
from cm_jax.parameterization import EDM, bcast

SOLVERS = {'euler': solvers.euler_step, 'heun': solvers.heun_step}


def make_discrete(config, model, edm: EDM, sample_levels, estimate_x_n, weight, target_rate=None) -> Objective:
  """The shared loss E[lambda(sigma_n) d(f_theta(x_{n+1}, sigma_{n+1}), sg f_theta-(x_hat_n, sigma_n))].

  sample_levels(rng, step, batch) -> (sigma_n, sigma_{n+1}, N): per-sample adjacent levels of the N-point grid.
  estimate_x_n(frozen, cond, x0, z, x_next, sigma_n, sigma_next) -> x_hat_n.
  weight(sigma_n, sigma_next) -> lambda; target_rate: None for theta- = sg(theta), else mu(step) of the EMA target.
  """
  distance = distances.get_distance(config.objective.distance, config.objective.get('lpips_weights', ''))

  def loss(params, extra, frozen, batch, rng, step):
    del extra
    x0 = batch['image']
    cond = labels(batch, config.model)
    rng_n, rng_z, rng_drop = jax.random.split(rng, 3)
    sigma, sigma_next, num_scales = sample_levels(rng_n, step, x0.shape[0])
    z = jax.random.normal(rng_z, x0.shape)
    x_next = x0 + bcast(sigma_next, x0) * z
    x_hat = estimate_x_n(frozen, cond, x0, z, x_next, sigma, sigma_next)
    theta_minus = params if target_rate is None else frozen['target']

    student = network(model, params, cond, rng_drop)
    target_net = network(model, jax.lax.stop_gradient(theta_minus), cond, rng_drop)
    pred = edm.consistency(student, x_next, sigma_next)
    target = jax.lax.stop_gradient(edm.consistency(target_net, jax.lax.stop_gradient(x_hat), sigma))
    loss = jnp.mean(weight(sigma, sigma_next) * distance(pred, target))
    return loss, {'loss': loss, 'num_scales': jnp.asarray(num_scales, jnp.float32)}

  return Objective(loss=loss, kind='consistency', target_rate=target_rate)


def _grid(config, edm: EDM):
  return dict(sigma_min=edm.sigma_min, sigma_max=edm.sigma_max, rho=config.parameterization.rho)


def _uniform_levels(num_scales_fn, grid):
  """n ~ U{0, ..., N(k) - 2}: (sigma_n, sigma_{n+1}) on the N(k)-point Karras grid (CM paper, CD and CT)."""
  def sample_levels(rng, step, batch):
    num_scales = num_scales_fn(step)
    n = jax.random.randint(rng, (batch,), 0, num_scales - 1)
    return schedules.karras_sigma(n, num_scales, **grid), schedules.karras_sigma(n + 1, num_scales, **grid), num_scales
  return sample_levels


def _data_estimate(frozen, cond, x0, z, x_next, sigma, sigma_next):
  """CT / iCT: x_hat_n = x0 + sigma_n z with the z of x_{n+1} (the one-sample estimate of the ODE step)."""
  del frozen, cond, x_next, sigma_next
  return x0 + bcast(sigma, x0) * z


def _unit_weight(sigma, sigma_next):
  """lambda(sigma_n) = 1 (CM paper)."""
  return jnp.ones_like(sigma)


def teacher_ode_step(solver: str, edm: EDM, teacher, x_next, sigma_next, sigma):
  """CD: x_hat_n = one Euler or Heun step of the teacher's PF-ODE dx/dsigma = (x - D(x, sigma)) / sigma."""
  return SOLVERS[solver](lambda x, s: edm.denoise(teacher, x, s), x_next, sigma_next, sigma)


def make_cd(config, model, edm: EDM) -> Objective:
  """Consistency distillation: d(f_theta(x_{n+1}, sigma_{n+1}), f_theta-(Phi(x_{n+1}; teacher), sigma_n)), fixed N.

  n ~ U{1..N-1}, lambda = 1, theta- <- mu theta- + (1 - mu) theta (mu = 0: theta- = sg(theta)).
  """
  obj = config.objective
  if not config.teacher.workdir:
    raise ValueError('objective.name=cd distils a diffusion teacher: set teacher.workdir to its run.')
  if obj.solver not in SOLVERS:
    raise ValueError(f'Unknown objective.solver {obj.solver!r}; expected one of {sorted(SOLVERS)}.')
  if obj.num_scales < 2:
    raise ValueError(f'objective.num_scales={obj.num_scales} must be at least 2.')
  if not 0.0 <= obj.target_ema < 1.0:
    raise ValueError(f'objective.target_ema={obj.target_ema} must be in [0, 1).')
  num_scales = jnp.int32(obj.num_scales)
  model = without_label_dropout(model)

  def estimate_x_n(frozen, cond, x0, z, x_next, sigma, sigma_next):
    del x0, z
    return teacher_ode_step(obj.solver, edm, network(model, frozen['teacher'], cond), x_next, sigma_next, sigma)

  mu = float(obj.target_ema)
  target_rate = None if mu == 0.0 else (lambda step: jnp.float32(mu))
  objective = make_discrete(config, model, edm, _uniform_levels(lambda step: num_scales, _grid(config, edm)),
                            estimate_x_n, _unit_weight, target_rate)
  return dataclasses.replace(objective, teacher='edm')


def make_ct(config, model, edm: EDM) -> Objective:
  """Consistency training (CM paper): N(k) grows from s0 + 1 to s1 + 1, n ~ U{1..N(k)-1}, lambda = 1,
  theta- <- mu(k) theta- + (1 - mu(k)) theta with mu(k) = exp(s0 ln(mu0) / N(k)) (or / (N(k) - 1): 'code')."""
  obj = config.objective
  if obj.mu_convention not in ('paper', 'code'):
    raise ValueError(f"Unknown objective.mu_convention {obj.mu_convention!r}; expected 'paper' or 'code'.")
  if not 0.0 < obj.mu0 < 1.0:
    raise ValueError(f'objective.mu0={obj.mu0} must be in (0, 1).')
  num_scales = lambda step: schedules.ct_num_scales(step, config.train.num_steps, obj.s0, obj.s1)
  target_rate = lambda step: schedules.ct_target_ema(num_scales(step), obj.s0, obj.mu0, obj.mu_convention)
  return make_discrete(config, model, edm, _uniform_levels(num_scales, _grid(config, edm)),
                       _data_estimate, _unit_weight, target_rate)


def make_ict(config, model, edm: EDM) -> Objective:
  """iCT: N(k) doubles from s0 to s1, n follows the lognormal index distribution, lambda = 1 / (sigma_{n+1} - sigma_n),
  d is pseudo-Huber over the whole sample and theta- = sg(theta)."""
  obj = config.objective
  grid = _grid(config, edm)

  def sample_levels(rng, step, batch):
    num_scales = schedules.ict_num_scales(step, config.train.num_steps, obj.s0, obj.s1)
    logits = schedules.lognormal_index_logits(num_scales, obj.s1 + 1, obj.p_mean, obj.p_std, **grid)
    n = jax.random.categorical(rng, logits, shape=(batch,))
    return schedules.karras_sigma(n, num_scales, **grid), schedules.karras_sigma(n + 1, num_scales, **grid), num_scales

  return make_discrete(config, model, edm, sample_levels, _data_estimate,
                       lambda sigma, sigma_next: 1.0 / (sigma_next - sigma))
