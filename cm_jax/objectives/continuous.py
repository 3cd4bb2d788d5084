"""Continuous-time consistency objectives with forward-mode JVP.

  sCT / sCD (Lu and Song 2024) on TrigFlow: the tangent cos(t) sin(t) dF-/dt from ONE jax.jvp, tangent warm-up and
  normalisation, the adaptive weighting network w_phi(t) (weighting.py; trained jointly: its parameters are the
  objective's `extra`), optional prior weighting 1/sigma; theta- = sg(theta).
  CT / CD in continuous time with stop-gradient (Song et al. 2023, Appendix B) on EDM: a pseudo-loss whose gradient is
  the N -> infinity limit of the (scaled) discrete CT/CD gradient. objective.weighting (optional) weights each sample
  f^T sg(df-/dsigma) by 2 (dsigma/du) / D ('paper', the default: the limit of the discrete loss) or by 1 ('code': the
  official JAX code's sum over dimensions with unit weight).

A finite-difference fallback (objective.jvp='finite_difference') replaces jax.jvp for kernels without forward-mode
rules. Mixed precision: when the network computes in bfloat16 (model.dtype, paper networks), only the trained
forward/backward does; the JVP, the teacher (float32 clones of the network: same parameters), the tangent g and the
loss are float32. sCT/sCD's objective.jvp_dtype='model' runs the JVP in the network's dtype instead: its primal is
then the trained forward pass itself, which XLA computes once (BUILD_NOTES: ImageNet-64 pre-flight). Every JVP runs
the network's forward-mode attention kernel (models/attention.forward_mode: 'flash' becomes 'flash_jvp').
"""

import functools
import math

import jax
import jax.numpy as jnp

from cm_jax import distances
from cm_jax import sampling
from cm_jax import solvers
from cm_jax.models.apply import can_guide, guided, network, without_guidance, without_label_dropout
from cm_jax.models.attention import forward_mode
from cm_jax.objectives.base import Objective, labels, sample_guidance
from cm_jax.objectives.weighting import AdaptiveWeighting
from cm_jax.parameterization import EDM, TrigFlow, bcast

CM_KEYS = {'name', 'jvp', 'fd_eps'}  # config.objective of ct_continuous / cd_continuous
SCT_KEYS = CM_KEYS | {'p_mean', 'p_std', 'tangent_warmup_steps', 'tangent_norm', 'tangent_norm_c', 'adaptive_weighting',
                      'prior_weighting'}
SCD_KEYS = SCT_KEYS | {'teacher', 'guidance_scale'}
JVP_DTYPES = ('float32', 'model')  # objective.jvp_dtype (sCT / sCD): the JVP's compute dtype
CM_WEIGHTINGS = ('paper', 'code')  # objective.weighting of ct_continuous / cd_continuous


# ----------------------------------------------------------------------------------------------------------
# Pieces shared by the objectives (pure functions; tested one by one).
# ----------------------------------------------------------------------------------------------------------
def directional_derivative(fn, x, t, dx, dt, method='jvp', fd_eps=1e-3):
  """(fn(x, t), d/dh fn(x + h dx, t + h dt) at h = 0) with per-sample t, dt [B].

  'jvp': one forward-mode jax.jvp. 'finite_difference': (fn(x + h dx, t + h dt) - fn(x - h dx, t - h dt)) / 2h with
  the per-sample h chosen so that the time moves by fd_eps |t| (three forward passes).
  """
  if method == 'jvp':
    return jax.jvp(fn, (x, t), (dx, dt))
  h = fd_eps * jnp.abs(t) / jnp.maximum(jnp.abs(dt), 1e-20)
  plus, minus = fn(x + bcast(h, x) * dx, t + h * dt), fn(x - bcast(h, x) * dx, t - h * dt)
  return fn(x, t), (plus - minus) / bcast(2.0 * h, plus)


def tangent_warmup(step, warmup_steps: int):
  """r = min(1, step / H); r = 1 from the start when H = 0."""
  if warmup_steps <= 0:
    return jnp.ones((), jnp.float32)
  return jnp.minimum(1.0, jnp.asarray(step, jnp.float32) / warmup_steps)


def tangent_norm(g, norm: str):
  """Per-sample ||g||: 'l2' = sqrt(sum g^2), 'rms' = sqrt(mean g^2)."""
  sq = jnp.reshape(g, (g.shape[0], -1)) ** 2
  return jnp.sqrt(jnp.sum(sq, -1) if norm == 'l2' else jnp.mean(sq, -1))


def normalize_tangent(g, norm: str, c: float):
  """g <- g / (||g|| + c), per sample."""
  return g / bcast(tangent_norm(g, norm) + c, g)


def float32_model(model):
  """The same network computing in float32 (a network without a `dtype` field always does)."""
  return model.clone(dtype='float32') if hasattr(model, 'dtype') else model


def karras_continuous(u, sigma_min, sigma_max, rho):
  """sigma(u) = (eps^(1/rho) + u (T^(1/rho) - eps^(1/rho)))^rho and d sigma/du, u in [0, 1]: the Karras grid's limit."""
  lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
  base = lo + u * (hi - lo)
  return base**rho, rho * (hi - lo) * base ** (rho - 1.0)


def scm_tangent(tf: TrigFlow, target_net, x_t, t, dxdt, r, method='jvp', fd_eps=1e-3):
  """g = -cos^2(t) (sd F- - dx_t/dt) - r (cos(t) sin(t) x_t + sd cos(t) sin(t) dF-/dt), un-normalised.

  sd cos(t) sin(t) dF-/dt is ONE JVP of F- at (x_t / sd, t) along (cos(t) sin(t) dx_t/dt, cos(t) sin(t) sd).
  """
  sd = tf.sigma_data
  cs = jnp.cos(t) * jnp.sin(t)
  f_minus, sd_cs_df = directional_derivative(target_net, x_t / sd, t, bcast(cs, x_t) * dxdt, cs * sd, method, fd_eps)
  cos2 = bcast(jnp.cos(t) ** 2, x_t)
  return -cos2 * (sd * f_minus - dxdt) - r * (bcast(cs, x_t) * x_t + sd_cs_df)


def cm_pseudo_loss(f, f_minus, x, sigma, dx_dsigma, weight, method='jvp', fd_eps=1e-3):
  """Per sample 2 weight / D f(x, sigma)^T sg(df-/dsigma), df-/dsigma = d_sigma f- + (d_x f-) dx/dsigma (CM App. B).

  Its gradient is the limit of the discrete loss's gradient with d = squared l2 (mean over dimensions) divided by the
  step sigma_{n+1} - sigma_n = weight / (N - 1).
  """
  _, df = directional_derivative(f_minus, x, sigma, dx_dsigma, jnp.ones_like(sigma), method, fd_eps)
  flat = lambda a: jnp.reshape(a, (a.shape[0], -1))
  return 2.0 * weight * jnp.mean(flat(f(x, sigma)) * flat(jax.lax.stop_gradient(df)), axis=-1)


def _check_common(config):
  obj = config.objective
  if obj.jvp not in ('jvp', 'finite_difference'):
    raise ValueError(f"objective.jvp={obj.jvp!r}; expected 'jvp' or 'finite_difference'.")
  if not obj.fd_eps > 0:
    raise ValueError(f'objective.fd_eps={obj.fd_eps} must be positive.')


# ----------------------------------------------------------------------------------------------------------
# sCT and sCD.
# ----------------------------------------------------------------------------------------------------------
def _check_scm(config, model, tf, distill):
  obj = config.objective
  _check_common(config)
  if not isinstance(tf, TrigFlow):
    raise ValueError(f"objective.name={obj.name!r} needs parameterization.name='trigflow'.")
  if obj.tangent_norm not in ('l2', 'rms'):
    raise ValueError(f"objective.tangent_norm={obj.tangent_norm!r}; expected 'l2' or 'rms'.")
  if obj.jvp_dtype not in JVP_DTYPES:
    raise ValueError(f"objective.jvp_dtype={obj.jvp_dtype!r}; expected 'float32' (the JVP in float32 whatever the "
                     "network's dtype) or 'model' (in model.dtype).")
  if not obj.tangent_norm_c > 0:
    raise ValueError(f'objective.tangent_norm_c={obj.tangent_norm_c} must be positive.')
  if obj.tangent_warmup_steps < 0:
    raise ValueError(f'objective.tangent_warmup_steps={obj.tangent_warmup_steps} must be >= 0.')
  if distill:
    if obj.teacher not in ('trigflow', 'edm'):
      raise ValueError(f"objective.teacher={obj.teacher!r}: sCD accepts a 'trigflow' teacher (v-prediction, "
                       "c_noise = t) or an 'edm' teacher (denoiser, used through t = arctan(sigma / sd)).")
    lo, hi = obj.guidance_scale
    if not 0 <= lo <= hi:
      raise ValueError(f'objective.guidance_scale={tuple(obj.guidance_scale)} must be (lo, hi) with 0 <= lo <= hi.')
    if (lo, hi) != (1.0, 1.0) and not can_guide(model):
      raise ValueError(f'objective.guidance_scale={tuple(obj.guidance_scale)} needs a class-conditional teacher '
                       'trained with model.label_dropout > 0 (a network where label -1 is the unconditional branch).')


def _guided_velocity(config, teacher_model, tf: TrigFlow):
  """dx_t/dt = v(x_t, t, null) + s (v(x_t, t, c) - v(x_t, t, null)) per example (s = 1: no guidance)."""
  obj = config.objective
  edm = EDM(sigma_data=tf.sigma_data, sigma_min=tf.sigma_min, sigma_max=tf.sigma_max)

  def velocity(params, x_t, t, cond):
    net = network(teacher_model, params, cond)
    return tf.velocity(net, x_t, t) if obj.teacher == 'trigflow' else tf.edm_velocity(edm, net, x_t, t)

  unguided = tuple(obj.guidance_scale) == (1.0, 1.0)
  return lambda params, x_t, t, cond, s: guided(lambda labels: velocity(params, x_t, t, labels), cond,
                                                None if unguided else s)


def make_scm(config, model, tf: TrigFlow, distill: bool) -> Objective:
  """L = exp(-w_phi(t)) lambda(t) / D ||F_theta(x_t / sd, t) - F_theta-(x_t / sd, t) - g||^2 + w_phi(t).

  g: `scm_tangent` with dx_t/dt = cos(t) z - sin(t) x0 (sCT) or the (guided) teacher's velocity (sCD), warmed up by
  r = min(1, step / H) and normalised g / (||g|| + c); lambda = 1 / (sd tan t) with prior_weighting, else 1;
  theta- = sg(theta), so F_theta- is the stop-gradient of the same forward pass (one shared dropout key).
  sCD: s ~ U[objective.guidance_scale] per example; a student with a guidance input (model.guidance_embedding)
  gets s in both F_theta and the JVP of F_theta-. The student learns the teacher's flow for the batch's labels,
  so its label dropout (model.label_dropout, the teacher's setting) is off: a dropped label would pair "no
  label" with a conditional target. The teacher is the same network without the guidance input.
  """
  _check_scm(config, model, tf, distill)
  obj = config.objective
  sd = tf.sigma_data
  if distill:
    model = without_label_dropout(model)
  model32 = float32_model(model)
  jvp_model = forward_mode(model32 if obj.jvp_dtype == 'float32' else model)
  weighting = AdaptiveWeighting(obj.adaptive_weighting)
  teacher_velocity = _guided_velocity(config, without_guidance(model32), tf) if distill else None

  def loss(params, extra, inputs, batch, rng, step):
    x0 = batch['image']
    cond = labels(batch, config.model)
    rng_t, rng_z, rng_drop, rng_s = jax.random.split(rng, 4)
    t = tf.sample_t(rng_t, (x0.shape[0],), obj.p_mean, obj.p_std)
    z = sd * jax.random.normal(rng_z, x0.shape)
    x_t = tf.noise(x0, z, t)
    s = None
    if distill:
      s = sample_guidance(rng_s, obj.guidance_scale, x0.shape[0])
      dxdt = teacher_velocity(inputs['teacher'], x_t, t, cond, s)
    else:
      dxdt = bcast(jnp.cos(t), x0) * z - bcast(jnp.sin(t), x0) * x0
    r = tangent_warmup(step, obj.tangent_warmup_steps)
    target_net = network(jvp_model, jax.lax.stop_gradient(params), cond, rng_drop, guidance=s)
    g = scm_tangent(tf, target_net, x_t, t, dxdt, r, obj.jvp, obj.fd_eps)
    g_norm = tangent_norm(g, obj.tangent_norm)
    g = jax.lax.stop_gradient(normalize_tangent(g, obj.tangent_norm, obj.tangent_norm_c))

    f_theta = network(model, params, cond, rng_drop, guidance=s)(x_t / sd, t)
    prior = 1.0 / (sd * jnp.tan(t)) if obj.prior_weighting else jnp.ones_like(t)
    per_sample, w = weighting(extra, t, prior * distances.squared_l2(f_theta, jax.lax.stop_gradient(f_theta + g)))
    loss = jnp.mean(per_sample)
    return loss, {'loss': loss, 'tangent_norm': jnp.mean(g_norm), 'tangent_warmup': r, 'adaptive_weight': jnp.mean(w)}

  feeds_guidance = distill and obj.guidance_scale[0] < obj.guidance_scale[1]
  return Objective(loss=loss, sampler=sampling.CONSISTENCY, init_extra=weighting.init, feeds_guidance=feeds_guidance,
                   distils=obj.teacher if distill else None)


# ----------------------------------------------------------------------------------------------------------
# The CM paper's continuous-time CT and CD.
# ----------------------------------------------------------------------------------------------------------
def make_cm_continuous(config, model, edm: EDM, distill: bool) -> Objective:
  """E_u[cm_pseudo_loss] with u ~ U(0, 1), sigma = sigma(u) (the Karras grid's limit), lambda = 1 and weight =
  d sigma/du (objective.weighting 'paper', the default) or D / 2 ('code': f^T sg(df-/dsigma) summed over dimensions).

  x = x0 + sigma z; dx/dsigma = z (CT: the score replaced by -(x - x0)/sigma^2) or (x - D_teacher(x, sigma)) / sigma
  (CD: the EDM teacher's PF-ODE). theta- = sg(theta). 'paper' is the N -> infinity limit of the discrete loss's
  gradient scaled by N - 1 (CM Appendix B); 'code' is the official JAX code's, which has the same samples of sigma but
  weights a sample at sigma D / (2 dsigma/du) times as much.
  """
  _check_common(config)
  obj = config.objective
  if not isinstance(edm, EDM):
    raise ValueError(f"objective.name={obj.name!r} needs parameterization.name='edm'.")
  weighting = obj.weighting
  if weighting not in CM_WEIGHTINGS:
    raise ValueError(f"objective.weighting={weighting!r}; expected 'paper' (2 (dsigma/du) / D per sample, the CM "
                     "paper) or 'code' (1, summed over dimensions: the official JAX code).")
  if distill:
    model = without_label_dropout(model)
  model32 = float32_model(model)
  rho = config.parameterization.rho

  def loss(params, extra, inputs, batch, rng, step):
    del extra, step
    x0 = batch['image']
    cond = labels(batch, config.model)
    rng_u, rng_z, rng_drop = jax.random.split(rng, 3)
    sigma, dsigma_du = karras_continuous(jax.random.uniform(rng_u, (x0.shape[0],)), edm.sigma_min, edm.sigma_max, rho)
    z = jax.random.normal(rng_z, x0.shape)
    x = x0 + bcast(sigma, x0) * z
    if distill:
      teacher = network(model32, inputs['teacher'], cond)
      dx_dsigma = solvers.pf_ode_derivative(lambda y, s: edm.denoise(teacher, y, s), x, sigma)
    else:
      dx_dsigma = z
    student = network(model, params, cond, rng_drop)
    target = network(forward_mode(model32), jax.lax.stop_gradient(params), cond, rng_drop)
    weight = dsigma_du if weighting == 'paper' else jnp.full_like(sigma, math.prod(x0.shape[1:]) / 2.0)
    per_sample = cm_pseudo_loss(functools.partial(edm.consistency, student), functools.partial(edm.consistency, target),
                                x, sigma, dx_dsigma, weight, obj.jvp, obj.fd_eps)
    loss = jnp.mean(per_sample)
    return loss, {'loss': loss}

  return Objective(loss=loss, sampler=sampling.CONSISTENCY, distils='edm' if distill else None)
