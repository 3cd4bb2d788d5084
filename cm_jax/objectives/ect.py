"""Easy Consistency Tuning (ECT, Geng et al. 2024): consistency tuning of a pretrained diffusion model."""

import jax
import jax.numpy as jnp

from cm_jax import distances
from cm_jax import sampling
from cm_jax import schedules
from cm_jax.models.apply import network
from cm_jax.objectives.base import Objective, labels
from cm_jax.parameterization import EDM, bcast

ECT_DISTANCES = ('l2_norm', 'pseudo_huber')


def make_ect(config, model, edm: EDM) -> Objective:
  """w(t, r) d(f_theta(x0 + t z, t), sg f_theta(x0 + r z, r)), ln t ~ N(P_mean, P_std^2), r = ect_r(t, k).

  Shared z and dropout key; where r <= sigma_min (the boundary) the target is the data x0.
  w = 1 / (t - r) ('inverse_delta', CIFAR-10) or (t^2 + sd^2) / (t sd)^2 ('edm', ImageNet-64).
  """
  obj = config.objective
  if obj.distance not in ECT_DISTANCES:
    raise ValueError(f'objective.distance={obj.distance!r}: ECT uses one of {ECT_DISTANCES}.')
  weightings = {'inverse_delta': lambda t, r: 1.0 / (t - r), 'edm': lambda t, r: edm.diffusion_weight(t)}
  if obj.weighting not in weightings:
    raise ValueError(f'Unknown objective.weighting {obj.weighting!r}; expected one of {sorted(weightings)}.')
  if obj.stage_steps <= 0 or obj.q <= 1.0:
    raise ValueError(f'objective.stage_steps={obj.stage_steps} must be positive and objective.q={obj.q} above 1.')
  distance, weight = distances.get_distance(obj.distance), weightings[obj.weighting]

  def loss(params, extra, frozen, batch, rng, step):
    del extra, frozen
    x0 = batch['image']
    cond = labels(batch, config.model)
    rng_t, rng_z, rng_drop = jax.random.split(rng, 3)
    t = jnp.clip(schedules.sample_lognormal_sigma(rng_t, (x0.shape[0],), obj.p_mean, obj.p_std),
                 edm.sigma_min, edm.sigma_max)
    r = schedules.ect_r(t, step, obj.stage_steps, obj.q)
    z = jax.random.normal(rng_z, x0.shape)
    at_data = r <= edm.sigma_min
    r_net = jnp.where(at_data, edm.sigma_min, r)

    pred = edm.consistency(network(model, params, cond, rng_drop), x0 + bcast(t, x0) * z, t)
    target_net = network(model, jax.lax.stop_gradient(params), cond, rng_drop)
    target = edm.consistency(target_net, x0 + bcast(r_net, x0) * z, r_net)
    target = jax.lax.stop_gradient(jnp.where(bcast(at_data, x0), x0, target))
    loss = jnp.mean(weight(t, r) * distance(pred, target))
    return loss, {'loss': loss, 'stage': schedules.ect_stage(step, obj.stage_steps).astype(jnp.float32)}

  return Objective(loss=loss, sampler=sampling.CONSISTENCY)
