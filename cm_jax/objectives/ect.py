"""Easy Consistency Tuning (ECT, Geng et al. 2024): consistency tuning of a pretrained diffusion model.

As the official code has it (locuslab/ect, training/loss.py ECMLoss, training/networks.py ECMPrecond): t is the
lognormal draw itself (no clipping to [sigma_min, sigma_max]); both network evaluations use EDM's denoiser scalings
(ECMPrecond in training mode), whose boundary is sigma = 0, so the data x0 is the target only where r = 0; the
sigma_min-shifted consistency scalings (ECMPrecond in eval mode, sigma_min = 0.003 in the CIFAR-10 configs) are for
sampling only (sampling.CONSISTENCY reads parameterization.sigma_min). notes_ect.md lists what still differs.
"""

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
  """w(t, r) d(D_theta(x0 + t z, t), sg D_theta(x0 + r z, r)), ln t ~ N(P_mean, P_std^2) unclipped, r = ect_r(t, k).

  D is EDM's denoiser (unshifted scalings). Shared z and dropout key; where r = 0 the target is the data x0.
  w = 1 / (t - r) ('inverse_delta', CIFAR-10) or (t^2 + sd^2) / (t sd)^2 ('edm', ImageNet-64).
  d: 'l2_norm' ||.||_2 (the official c = 0) or 'pseudo_huber' sqrt(||.||^2 + c^2) - c, c = 0.00054 sqrt(D)
  (0.0599 at 64x64x3; the official ImageNet-64 run: c = 0.06).
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

  def loss(params, extra, inputs, batch, rng, step):
    del extra, inputs
    x0 = batch['image']
    cond = labels(batch, config.model)
    rng_t, rng_z, rng_drop = jax.random.split(rng, 3)
    t = schedules.sample_lognormal_sigma(rng_t, (x0.shape[0],), obj.p_mean, obj.p_std)
    r = schedules.ect_r(t, step, obj.stage_steps, obj.q)
    z = jax.random.normal(rng_z, x0.shape)
    at_data = r <= 0.0
    r_net = jnp.where(at_data, t, r)  # any positive level: D(x, 0) is undefined (ln 0), its output is masked out

    pred = edm.denoise(network(model, params, cond, rng_drop), x0 + bcast(t, x0) * z, t)
    target_net = network(model, jax.lax.stop_gradient(params), cond, rng_drop)
    target = edm.denoise(target_net, x0 + bcast(r_net, x0) * z, r_net)
    target = jax.lax.stop_gradient(jnp.where(bcast(at_data, x0), x0, target))
    loss = jnp.mean(weight(t, r) * distance(pred, target))
    return loss, {'loss': loss, 'stage': schedules.ect_stage(step, obj.stage_steps).astype(jnp.float32)}

  return Objective(loss=loss, sampler=sampling.CONSISTENCY)
