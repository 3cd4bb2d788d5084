"""Diffusion teachers: the EDM denoising loss and the TrigFlow v-prediction loss."""

import jax
import jax.numpy as jnp

from cm_jax import distances
from cm_jax import sampling
from cm_jax import schedules
from cm_jax.models.apply import network
from cm_jax.objectives.base import Objective, labels
from cm_jax.objectives.weighting import AdaptiveWeighting
from cm_jax.parameterization import EDM, TrigFlow, bcast


def make_edm(config, model, edm: EDM) -> Objective:
  """E_{sigma, z} lambda(sigma) ||D(x0 + sigma z, sigma) - x0||^2, ln sigma ~ N(P_mean, P_std^2)."""
  obj = config.objective

  def loss(params, extra, inputs, batch, rng, step):
    del extra, inputs, step
    x0 = batch['image']
    rng_sigma, rng_z, rng_drop = jax.random.split(rng, 3)
    sigma = schedules.sample_lognormal_sigma(rng_sigma, (x0.shape[0],), obj.p_mean, obj.p_std)
    x_noisy = x0 + sigma.reshape((-1,) + (1,) * (x0.ndim - 1)) * jax.random.normal(rng_z, x0.shape)
    net = network(model, params, labels(batch, config.model), rng_drop)
    per_sample = edm.diffusion_weight(sigma) * distances.squared_l2(edm.denoise(net, x_noisy, sigma), x0)
    loss = jnp.mean(per_sample)
    return loss, {'loss': loss}

  return Objective(loss=loss, sampler=sampling.EDM_HEUN)


def make_trigflow_diffusion(config, model, tf: TrigFlow) -> Objective:
  """E_{t, z} [exp(-w_phi(t)) ||F(x_t / sd, t) - v_t / sd||^2 / D + w_phi(t)], v_t = cos(t) z - sin(t) x0,
  t = arctan(e^tau / sd), tau ~ N(Pm, Ps^2); w_phi: sCM's adaptive weighting with objective.adaptive_weighting
  (off when the key is absent), else w = 0."""
  obj = config.objective
  if not isinstance(tf, TrigFlow):
    raise ValueError("objective.name='trigflow' needs parameterization.name='trigflow'.")
  weighting = AdaptiveWeighting(bool(obj.adaptive_weighting))

  def loss(params, extra, inputs, batch, rng, step):
    del inputs, step
    x0 = batch['image']
    rng_t, rng_z, rng_drop = jax.random.split(rng, 3)
    t = tf.sample_t(rng_t, (x0.shape[0],), obj.p_mean, obj.p_std)
    z = tf.sigma_data * jax.random.normal(rng_z, x0.shape)
    v_t = bcast(jnp.cos(t), x0) * z - bcast(jnp.sin(t), x0) * x0
    v_pred = tf.velocity(network(model, params, labels(batch, config.model), rng_drop), tf.noise(x0, z, t), t)
    per_sample, w = weighting(extra, t, distances.squared_l2(v_pred, v_t) / tf.sigma_data**2)
    loss = jnp.mean(per_sample)
    return loss, {'loss': loss, 'adaptive_weight': jnp.mean(w)}

  return Objective(loss=loss, sampler=sampling.EDM_HEUN, init_extra=weighting.init)
