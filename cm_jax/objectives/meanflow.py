"""MeanFlow (Geng et al. 2025): the average velocity u(z_t, r, t) = 1/(t - r) int_r^t v(z_s, s) ds of the flow
z_t = (1 - t) x + t e, learned from scratch with one forward-mode JVP per step.

The MeanFlow identity u = v - (t - r) du/dt, du/dt = v d_z u + d_t u (the total derivative along the flow, r fixed),
gives the target u_tgt = v - (t - r) sg(du/dt) with du/dt ONE jax.jvp of u along the tangent (dz, dr, dt) = (v, 0, 1)
at v = e - x. (t, r): two logit-normal draws sorted so that t >= r, then r = t for a fraction objective.flow_share
of the batch (flow matching: u(z, t, t) = v). Loss: sg(w) ||u - sg(u_tgt)||^2 with the adaptive weight
w = 1 / (||delta||^2 + c)^p, ||delta||^2 summed over dimensions (paper Eq. 9-10; p = objective.norm_p, c =
objective.norm_c). The network needs the second time input (model.second_time: it embeds t - r besides t).
Sampling: sampling.MEANFLOW (1 NFE: x = e - u(e, 0, 1); 2 NFE through t = 0.5).

Defaults of the paper (Table 4 / its appendix; ImageNet-256): logit-normal (-0.4, 1.0), r != t for 25% of the
batch (flow_share = 0.75), p = 1, c = 1e-3 (the paper's text; c is a small constant "e.g. 1e-3"); CIFAR-10 (UNet):
logit-normal (-2.0, 2.0), r != t for 75% (flow_share = 0.25), p = 0.75.
"""

import jax
import jax.numpy as jnp

from cm_jax import sampling
from cm_jax.models.apply import network, takes_second_time
from cm_jax.models.attention import forward_mode
from cm_jax.objectives.base import Objective, labels
from cm_jax.objectives.continuous import float32_model
from cm_jax.objectives.flow_matching import check_flow_matching
from cm_jax.parameterization import FlowMatching, bcast

KEYS = {'name', 'p_mean', 'p_std', 'flow_share', 'norm_p', 'norm_c'}


def sample_t_r(rng, batch: int, p_mean, p_std, flow_share, fm: FlowMatching = FlowMatching()):
  """(t, r) [B]: two logit-normal draws sorted so that t >= r; r = t with probability flow_share."""
  rng_a, rng_b, rng_share = jax.random.split(rng, 3)
  a, b = (fm.sample_t(k, (batch,), p_mean, p_std) for k in (rng_a, rng_b))
  t, r = jnp.maximum(a, b), jnp.minimum(a, b)
  return t, jnp.where(jax.random.uniform(rng_share, (batch,)) < flow_share, t, r)


def meanflow_target(u_fn, z, r, t, v):
  """(u(z, r, t), du/dt, u_tgt = v - (t - r) du/dt) with du/dt = jax.jvp of u_fn along (dz, dr, dt) = (v, 0, 1)."""
  u, dudt = jax.jvp(u_fn, (z, r, t), (v, jnp.zeros_like(r), jnp.ones_like(t)))
  return u, dudt, v - bcast(t - r, v) * dudt


def adaptive_weight(sq_norm, p, c):
  """w = 1 / (||delta||^2 + c)^p (stop-gradient): sg(w) ||delta||^2 is the loss ||delta||^(2 (1 - p)) in value."""
  return jax.lax.stop_gradient(1.0 / (sq_norm + c) ** p)


def two_time(fm: FlowMatching, net):
  """u(z, r, t) of a second-time network: F(z, c_noise(t), interval = t - r)."""
  return lambda z, r, t: net(z, fm.c_noise(t), t - r)


def make_meanflow(config, model, fm: FlowMatching) -> Objective:
  """sg(w) ||u_theta(z_t, r, t) - sg(v - (t - r) du_theta/dt)||^2 (module docstring); sampled by sampling.MEANFLOW."""
  check_flow_matching(config, fm, 'meanflow')
  obj = config.objective
  if not takes_second_time(model):
    raise ValueError("objective.name='meanflow' trains a two-time network u(z_t, r, t): set model.second_time=True "
                     '(the MLP embeds the interval t - r).')
  if not 0.0 <= obj.flow_share <= 1.0:
    raise ValueError(f'objective.flow_share={obj.flow_share} (the share of r = t samples) must be in [0, 1].')
  if not obj.norm_c > 0 or obj.norm_p < 0:
    raise ValueError(f'objective.norm_c={obj.norm_c} must be positive and objective.norm_p={obj.norm_p} >= 0.')
  jvp_model = forward_mode(float32_model(model))

  def loss(params, extra, frozen, batch, rng, step):
    del extra, frozen, step
    x = batch['image']
    cond = labels(batch, config.model)
    rng_t, rng_e, rng_drop = jax.random.split(rng, 3)
    t, r = sample_t_r(rng_t, x.shape[0], obj.p_mean, obj.p_std, obj.flow_share, fm)
    e = jax.random.normal(rng_e, x.shape)
    z, v = fm.noise(x, e, t), fm.target_velocity(x, e)
    u_sg = two_time(fm, network(jvp_model, jax.lax.stop_gradient(params), cond, rng_drop))
    _, dudt, u_tgt = meanflow_target(u_sg, z, r, t, v)
    u = two_time(fm, network(model, params, cond, rng_drop))(z, r, t)
    sq = jnp.sum(jnp.reshape(u - jax.lax.stop_gradient(u_tgt), (x.shape[0], -1)) ** 2, axis=-1)
    w = adaptive_weight(sq, obj.norm_p, obj.norm_c)
    loss = jnp.mean(w * sq)
    return loss, {'loss': loss, 'mse': jnp.mean(sq) / (z.size // z.shape[0]), 'adaptive_weight': jnp.mean(w),
                  'dudt_norm': jnp.mean(jnp.sqrt(jnp.sum(jnp.reshape(dudt, (x.shape[0], -1)) ** 2, -1)))}

  return Objective(loss=loss, sampler=sampling.MEANFLOW)
