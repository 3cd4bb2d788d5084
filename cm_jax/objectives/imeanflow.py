"""Improved MeanFlow (iMF; Geng, Lu et al. 2025, "Improved Mean Flows: On the Challenges of Fastforward Generative
Models"): MeanFlow's average velocity u(z_t, r, t) trained by a loss on the instantaneous velocity.

V = u(z_t, r, t) + (t - r) sg(du/dt) is a prediction of the velocity at z_t (the MeanFlow identity read the other
way), regressed on the (guided) conditional velocity: sg(w) ||V - sg(v_g)||^2, w = 1 / (||V - v_g||^2 + c)^p (p =
objective.norm_p, c = objective.norm_c; the official code's norm_eps = 0.01). du/dt is ONE jax.jvp of u along
(dz, dr, dt) = (v_c, 0, 1), the tangent being the network's own velocity prediction v_c (a function of z_t alone),
not the sample's e - x: here v_c = u(z_t, t, t | c, omega) (the boundary condition u(z, t, t) = v, paper Sec. 4.1).
As in MeanFlow (meanflow.average_velocity; objective.jvp_dtype), that jax.jvp's primal is the trained u: the step is
MeanFlow's plus the forward of v_c (without gradient), which the JVP needs as its input and so cannot share; the
official imf.py computes it by a separate forward too (its v-head's v_cond_fn).
(t, r): MeanFlow's sampler (objectives/meanflow.py) with r = t for objective.flow_share = 0.5 of the batch.

Guidance as a condition (paper Sec. 5; official imf.py iMeanFlow.guidance_fn, sample_cfg_scale): on class-conditional
runs each example draws a CFG scale omega in [1, 1 + objective.cfg_scale_max] with density ~ omega^-beta
(objective.cfg_beta; the official s_max = 7, beta = 1), fed to the network (model.guidance_embedding) and given to it
at sampling (sampling.guidance_scale); for t in objective.cfg_interval the target is v_g = v + (1 - 1/omega)
(v_c - v_u), v_u = u(z_t, t, t | none, 1), else v_g = v; each label is dropped with probability
objective.class_dropout and a dropped label's target is v. cfg_scale_max = 0 (the default): omega = 1, v_g = v.

Differences from the official code (imf.py): its network has an auxiliary v-head (a second output, trained by
||v - v_g||^2 and giving v_c, v_u); no cm_jax network has a second output, so objective.aux_v_head=True is refused
and u(z, t, t) stands in for the head. Its guidance interval [t_min, t_max] is sampled per example (t_min ~ U(0, 0.5),
t_max ~ U(0.5, 1)) and fed to the network; no cm_jax network takes an interval input, so the interval here is the
fixed objective.cfg_interval (objective.cfg_interval_sampling=True is refused). It drops a Binomial count of labels
at the front of the batch and puts r = t on the first half of the batch; here both are per-example Bernoulli draws.
Sampling: sampling.MEANFLOW, as MeanFlow.
"""

import jax
import jax.numpy as jnp

from cm_jax import sampling
from cm_jax.models.apply import network, null_condition, takes_guidance
from cm_jax.objectives import meanflow
from cm_jax.objectives.base import Objective, labels
from cm_jax.parameterization import FlowMatching, bcast

KEYS = meanflow.KEYS
# The optional keys and their defaults (guidance off; the official code: cfg_scale_max = 7, cfg_beta = 1).
OPTIONAL = {'cfg_scale_max': 0.0, 'cfg_beta': 1.0, 'cfg_interval': (0.0, 1.0), 'cfg_interval_sampling': False,
            'class_dropout': 0.1, 'aux_v_head': False, 'jvp_dtype': 'float32'}



def sample_cfg_scale(rng, batch: int, s_max, beta):
  """omega [B] in [1, 1 + s_max] with density ~ omega^-beta (inverse CDF of a uniform u): (1 + s_max)^u for beta = 1,
  else (1 + u ((1 + s_max)^(1 - beta) - 1))^(1 / (1 - beta))."""
  u = jax.random.uniform(rng, (batch,))
  if beta == 1.0:
    return (1.0 + s_max) ** u
  return (1.0 + u * ((1.0 + s_max) ** (1.0 - beta) - 1.0)) ** (1.0 / (1.0 - beta))


def make_imeanflow(config, model, fm: FlowMatching) -> Objective:
  """sg(w) ||u + (t - r) sg(du/dt) - sg(v_g)||^2 with the tangent u(z_t, t, t) (module docstring)."""
  meanflow.check_two_time(config, model, fm, 'imeanflow')
  obj = config.objective
  if obj.aux_v_head:
    raise ValueError('objective.aux_v_head=True needs a network with a second (velocity) output head, which no '
                     'cm_jax network has: set it False (the tangent and the guidance velocities are then u(z, t, t)).')
  if obj.cfg_interval_sampling:
    raise ValueError('objective.cfg_interval_sampling=True feeds a per-example guidance interval to the network, '
                     'and no cm_jax network takes an interval input: set it False and fix objective.cfg_interval.')
  interval = meanflow.check_guidance_interval('cfg_interval', obj.cfg_interval)
  s_max, beta = float(obj.cfg_scale_max), float(obj.cfg_beta)
  conditional = config.model.get('num_classes', 0) > 0
  if s_max < 0 or beta < 0:
    raise ValueError(f'objective.cfg_scale_max={s_max} and objective.cfg_beta={beta} must be >= 0.')
  if s_max > 0 and not (conditional and takes_guidance(model)):
    raise ValueError(f'objective.cfg_scale_max={s_max} samples a CFG scale per example as a condition: it needs '
                     'class labels (model.num_classes > 0) and a guidance input (model.guidance_embedding=True); '
                     'or set cfg_scale_max=0.')
  if takes_guidance(model) and s_max == 0:
    raise ValueError('model.guidance_embedding=True but objective.cfg_scale_max=0 feeds the network no CFG scale: '
                     'set cfg_scale_max > 0 (official: 7), or model.guidance_embedding=False.')
  u_model, jvp_model = meanflow.jvp_networks(model, obj.jvp_dtype)

  def loss(params, extra, inputs, batch, rng, step):
    del extra, inputs, step
    x = batch['image']
    cond = labels(batch, config.model)
    rng_draw, rng_omega, rng_net = jax.random.split(rng, 3)
    t, r, e, drop = meanflow.draw(rng_draw, x, obj, fm, cond is not None)
    omega = sample_cfg_scale(rng_omega, x.shape[0], s_max, beta) if s_max > 0 else jnp.ones_like(t)
    z, v = fm.noise(x, e, t), fm.target_velocity(x, e)
    params_sg = jax.lax.stop_gradient(params)
    velocity = lambda c, s: meanflow.two_time(fm, network(model, params_sg, c, guidance=s))(z, t, t)
    w = jnp.where((t >= interval[0]) & (t <= interval[1]), omega, 1.0)
    v_c = velocity(cond, w)
    if s_max > 0:
      v_g = v + bcast(1.0 - 1.0 / w, v) * (v_c - velocity(null_condition(cond), jnp.ones_like(t)))
      v = jnp.where(bcast(drop, v), v, v_g)
    cond = meanflow.drop_labels(cond, drop)
    net = lambda m: None if m is None else lambda p: meanflow.two_time(fm, network(m, p, cond, rng_net,
                                                                                   guidance=omega))
    u, dudt = meanflow.average_velocity(net(u_model), net(jvp_model), params, z, r, t, v_c)
    V = u + bcast(t - r, u) * dudt
    weighted, sq, weight = meanflow.weighted_sq(V - jax.lax.stop_gradient(v), obj.norm_p, obj.norm_c)
    loss = jnp.mean(weighted)
    return loss, {'loss': loss, 'mse': jnp.mean(sq) / (z.size // z.shape[0]), 'adaptive_weight': jnp.mean(weight),
                  'dudt_norm': jnp.mean(jnp.sqrt(jnp.sum(jnp.reshape(dudt, (x.shape[0], -1)) ** 2, -1)))}

  return Objective(loss=loss, sampler=sampling.MEANFLOW, feeds_guidance=s_max > 0)
