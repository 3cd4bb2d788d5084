"""Discrete-time consistency training: improved CT (iCT, Song and Dhariwal 2023)."""

import jax
import jax.numpy as jnp

from cm_jax import distances
from cm_jax import schedules
from cm_jax.objectives.base import Objective, labels, network
from cm_jax.parameterization import EDM, bcast


def make_ict(config, model, edm: EDM) -> Objective:
  """lambda(sigma_i) d(f_theta(x0 + sigma_{i+1} z, sigma_{i+1}), f_sg(theta)(x0 + sigma_i z, sigma_i)).

  N(k) doubles from s0 to s1, i follows the lognormal index distribution, lambda = 1 / (sigma_{i+1} - sigma_i),
  d is pseudo-Huber over the whole sample, theta- = sg(theta), and both calls share one dropout key.
  """
  obj = config.objective
  grid = dict(sigma_min=edm.sigma_min, sigma_max=edm.sigma_max, rho=config.parameterization.rho)
  distance = distances.get_distance(obj.distance)

  def loss(params, extra, frozen, batch, rng, step):
    del extra, frozen
    x0 = batch['image']
    cond = labels(batch, config.model)
    rng_i, rng_z, rng_drop = jax.random.split(rng, 3)
    num_scales = schedules.ict_num_scales(step, config.train.num_steps, obj.s0, obj.s1)
    logits = schedules.lognormal_index_logits(num_scales, obj.s1 + 1, obj.p_mean, obj.p_std, **grid)
    i = jax.random.categorical(rng_i, logits, shape=(x0.shape[0],))
    sigma = schedules.karras_sigma(i, num_scales, **grid)
    sigma_next = schedules.karras_sigma(i + 1, num_scales, **grid)
    z = jax.random.normal(rng_z, x0.shape)

    student = network(model, params, cond, rng_drop)
    target_net = network(model, jax.lax.stop_gradient(params), cond, rng_drop)
    pred = edm.consistency(student, x0 + bcast(sigma_next, x0) * z, sigma_next)
    target = jax.lax.stop_gradient(edm.consistency(target_net, x0 + bcast(sigma, x0) * z, sigma))
    weight = 1.0 / (sigma_next - sigma)
    loss = jnp.mean(weight * distance(pred, target))
    return loss, {'loss': loss, 'num_scales': num_scales.astype(jnp.float32)}

  return Objective(loss=loss, kind='consistency')
