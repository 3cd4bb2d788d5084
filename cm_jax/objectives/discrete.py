"""Discrete-time consistency models: distillation (CD) and training (CT) of the CM paper, and improved CT (iCT).

All three minimise lambda(sigma_n) d(f_theta(x_{n+1}, sigma_{n+1}), f_theta-(x_hat_n, sigma_n)) with
x_{n+1} = x0 + sigma_{n+1} z and one dropout key shared by both calls; they differ in how n is drawn, in
x_hat_n (CD: one teacher ODE step from x_{n+1}; CT and iCT: x0 + sigma_n z with the same z), in lambda and in
theta- (an EMA target when target_rate is set, else sg(theta)).

The options of improved latent CT (Dao et al. 2025) apply to all three, each switched on by its own key:
  objective.distance 'cauchy' (or 'geman_mcclure', 'pseudo_huber', ...) with objective.c_schedule 'fixed' (c =
    objective.distance_c, 0: the distance's default) or 'adaptive' (schedules.lct_adaptive_c on the iCT curriculum);
  objective.diffusion_loss_weight w > 0: + w (1/sigma^2 + 1/sd^2) mean_D (f_theta(x_{n+1}, sigma_{n+1}) - x0)^2 averaged
    over the samples whose pair is near sigma_min (schedules.near_sigma_min, objective.diffusion_loss_fraction);
  objective.coupling 'exact' or 'sinkhorn': z paired with the data by minibatch OT (couplings.py) before use.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp

from cm_jax import couplings
from cm_jax import distances
from cm_jax import sampling
from cm_jax import schedules
from cm_jax import solvers
from cm_jax.models.apply import network, without_label_dropout
from cm_jax.objectives.base import Objective, labels
from cm_jax.parameterization import EDM, bcast

C_SCHEDULES = ('fixed', 'adaptive')

SOLVERS = {'euler': solvers.euler_step, 'heun': solvers.heun_step}


def distance_scale(config):
  """c(num_scales, D) of the objective's distance: objective.distance_c (0: the distance's default, None) when
  objective.c_schedule = 'fixed', or improved latent CT's adaptive c on the iCT curriculum ('adaptive')."""
  obj = config.objective
  schedule, c = obj.c_schedule, float(obj.distance_c)
  if schedule not in C_SCHEDULES:
    raise ValueError(f'objective.c_schedule={schedule!r}; expected one of {C_SCHEDULES}.')
  if (schedule == 'adaptive' or c) and obj.distance not in distances.SCALED:
    raise ValueError(f'objective.c_schedule={schedule!r} / distance_c={c} set a scale, which objective.distance='
                     f'{obj.distance!r} does not have (distances with one: {distances.SCALED}).')
  if c < 0:
    raise ValueError(f'objective.distance_c={c} must be positive (or 0 for the distance\'s default).')
  if schedule == 'adaptive':
    if obj.name != 'ict':
      raise ValueError(f"objective.c_schedule='adaptive' follows the iCT curriculum; objective.name={obj.name!r}.")
    return lambda num_scales, dim: schedules.lct_adaptive_c(num_scales, obj.s0, dim)
  return lambda num_scales, dim: c or None


def diffusion_loss(edm: EDM, pred, x0, sigma_next, near_min):
  """(1/sigma^2 + 1/sd^2) mean_D (f - x0)^2 averaged over the samples with near_min; 0 when there are none."""
  per_sample = (1.0 / sigma_next**2 + 1.0 / edm.sigma_data**2) * distances.squared_l2(pred, x0)
  weight = near_min.astype(per_sample.dtype)
  return jnp.sum(weight * per_sample) / jnp.maximum(jnp.sum(weight), 1.0)


def make_discrete(config, model, edm: EDM, sample_levels, estimate_x_n, weight, target_rate=None) -> Objective:
  """The shared loss E[lambda(sigma_n) d(f_theta(x_{n+1}, sigma_{n+1}), sg f_theta-(x_hat_n, sigma_n))].

  sample_levels(rng, step, batch) -> (n, N): per-sample pair indices n of the N-point Karras grid (adjacent levels
  sigma_n < sigma_{n+1}). estimate_x_n(inputs, cond, x0, z, x_next, sigma_n, sigma_next) -> x_hat_n.
  weight(sigma_n, sigma_next) -> lambda; target_rate: None for theta- = sg(theta), else mu(step) of the EMA target.
  """
  obj = config.objective
  distance = distances.get_distance(obj.distance)
  scale = distance_scale(config)
  coupling, diffusion_weight = obj.coupling, float(obj.diffusion_loss_weight)
  couplings.check(coupling)
  if diffusion_weight < 0:
    raise ValueError(f'objective.diffusion_loss_weight={diffusion_weight} must be >= 0.')
  fraction = float(obj.diffusion_loss_fraction)
  if not 0 < fraction <= 1:
    raise ValueError(f'objective.diffusion_loss_fraction={fraction} must be in (0, 1].')
  grid = _grid(config, edm)

  def loss(params, extra, inputs, batch, rng, step):
    del extra
    x0 = batch['image']
    cond = labels(batch, config.model)
    rng_n, rng_z, rng_drop = jax.random.split(rng, 3)
    n, num_scales = sample_levels(rng_n, step, x0.shape[0])
    sigma, sigma_next = (schedules.karras_sigma(i, num_scales, **grid) for i in (n, n + 1))
    z = couplings.couple(coupling, x0, jax.random.normal(rng_z, x0.shape), jax.random.fold_in(rng, 3),
                         float(obj.sinkhorn_epsilon))
    x_next = x0 + bcast(sigma_next, x0) * z
    x_hat = estimate_x_n(inputs, cond, x0, z, x_next, sigma, sigma_next)
    theta_minus = params if target_rate is None else inputs['target']

    student = network(model, params, cond, rng_drop)
    target_net = network(model, jax.lax.stop_gradient(theta_minus), cond, rng_drop)
    pred = edm.consistency(student, x_next, sigma_next)
    target = jax.lax.stop_gradient(edm.consistency(target_net, jax.lax.stop_gradient(x_hat), sigma))
    c = scale(num_scales, math.prod(x0.shape[1:]))
    loss = jnp.mean(weight(sigma, sigma_next) * distance(pred, target, c, inputs))
    metrics = {'num_scales': jnp.asarray(num_scales, jnp.float32)}
    if c is not None:
      metrics['distance_c'] = jnp.asarray(c, jnp.float32)
    if diffusion_weight:
      near_min = schedules.near_sigma_min(n, num_scales, fraction)
      metrics['diffusion_loss'] = diffusion_loss(edm, pred, x0, sigma_next, near_min)
      loss = loss + diffusion_weight * metrics['diffusion_loss']
    return loss, dict(metrics, loss=loss)

  return Objective(loss=loss, sampler=sampling.CONSISTENCY, target_rate=target_rate,
                   inputs=distances.step_inputs(obj.distance, obj.lpips_weights))


def _grid(config, edm: EDM):
  return dict(sigma_min=edm.sigma_min, sigma_max=edm.sigma_max, rho=config.parameterization.rho)


def _uniform_levels(num_scales_fn):
  """n ~ U{0, ..., N(k) - 2}: the pair (sigma_n, sigma_{n+1}) of the N(k)-point Karras grid (CM paper, CD and CT)."""
  def sample_levels(rng, step, batch):
    num_scales = num_scales_fn(step)
    return jax.random.randint(rng, (batch,), 0, num_scales - 1), num_scales
  return sample_levels


def _data_estimate(inputs, cond, x0, z, x_next, sigma, sigma_next):
  """CT / iCT: x_hat_n = x0 + sigma_n z with the z of x_{n+1} (the one-sample estimate of the ODE step)."""
  del inputs, cond, x_next, sigma_next
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
  if obj.solver not in SOLVERS:
    raise ValueError(f'Unknown objective.solver {obj.solver!r}; expected one of {sorted(SOLVERS)}.')
  if obj.num_scales < 2:
    raise ValueError(f'objective.num_scales={obj.num_scales} must be at least 2.')
  if not 0.0 <= obj.target_ema < 1.0:
    raise ValueError(f'objective.target_ema={obj.target_ema} must be in [0, 1).')
  num_scales = jnp.int32(obj.num_scales)
  model = without_label_dropout(model)

  def estimate_x_n(inputs, cond, x0, z, x_next, sigma, sigma_next):
    del x0, z
    return teacher_ode_step(obj.solver, edm, network(model, inputs['teacher'], cond), x_next, sigma_next, sigma)

  mu = float(obj.target_ema)
  target_rate = None if mu == 0.0 else (lambda step: jnp.float32(mu))
  objective = make_discrete(config, model, edm, _uniform_levels(lambda step: num_scales),
                            estimate_x_n, _unit_weight, target_rate)
  return dataclasses.replace(objective, distils='edm')


def make_ct(config, model, edm: EDM) -> Objective:
  """Consistency training (CM paper): N(k) grows from s0 to s1 + 1, n ~ U{1..N(k)-1}, lambda = 1,
  theta- <- mu(k) theta- + (1 - mu(k)) theta with mu(k) = exp(s0 ln(mu0) / N(k)) (or / (N(k) - 1): 'code')."""
  obj = config.objective
  if obj.s0 < 2 or obj.s1 < obj.s0:
    raise ValueError(f'objective.s0={obj.s0}, s1={obj.s1}: CT starts with N(0) = s0 levels, which needs s0 >= 2 '
                     '(one level has no pair to compare; the official code clamps it), and s1 >= s0.')
  if obj.mu_convention not in ('paper', 'code'):
    raise ValueError(f"Unknown objective.mu_convention {obj.mu_convention!r}; expected 'paper' or 'code'.")
  if not 0.0 < obj.mu0 < 1.0:
    raise ValueError(f'objective.mu0={obj.mu0} must be in (0, 1).')
  num_scales = lambda step: schedules.ct_num_scales(step, config.train.num_steps, obj.s0, obj.s1)
  target_rate = lambda step: schedules.ct_target_ema(num_scales(step), obj.s0, obj.mu0, obj.mu_convention)
  return make_discrete(config, model, edm, _uniform_levels(num_scales),
                       _data_estimate, _unit_weight, target_rate)


def make_ict(config, model, edm: EDM) -> Objective:
  """iCT: N(k) doubles from s0 to s1, n follows the lognormal index distribution, lambda = 1 / (sigma_{n+1} - sigma_n),
  d is pseudo-Huber over the whole sample and theta- = sg(theta)."""
  obj = config.objective
  if obj.s0 < 1 or obj.s1 < obj.s0:
    raise ValueError(f'objective.s0={obj.s0}, s1={obj.s1}: iCT needs 1 <= s0 <= s1.')
  grid = _grid(config, edm)

  def sample_levels(rng, step, batch):
    num_scales = schedules.ict_num_scales(step, config.train.num_steps, obj.s0, obj.s1)
    logits = schedules.lognormal_index_logits(num_scales, obj.s1 + 1, obj.p_mean, obj.p_std, **grid)
    return jax.random.categorical(rng, logits, shape=(batch,)), num_scales

  return make_discrete(config, model, edm, sample_levels, _data_estimate,
                       lambda sigma, sigma_next: 1.0 / (sigma_next - sigma))
