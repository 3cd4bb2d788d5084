"""MeanFlow (Geng et al. 2025): the average velocity u(z_t, r, t) = 1/(t - r) int_r^t v(z_s, s) ds of the flow
z_t = (1 - t) x + t e, learned from scratch with one forward-mode JVP per step.

The MeanFlow identity u = v - (t - r) du/dt, du/dt = v d_z u + d_t u (the total derivative along the flow, r fixed),
gives the target u_tgt = v_g - (t - r) sg(du/dt) with du/dt ONE jax.jvp of u along the tangent (dz, dr, dt) =
(v_g, 0, 1), v_g the (guided) velocity. That jax.jvp's primal is the trained u (`average_velocity`, as the official
meanflow.py MeanFlow.forward): the step costs the primal, its tangent and the primal's backward. objective.jvp_dtype
(sCT's key): 'model' runs that one JVP in the network's dtype; 'float32' (the default) runs it in float32, which for
a network computing in another dtype (model.dtype='bfloat16') means a float32 clone for du/dt (on stop-gradient
parameters) and a second, trained forward for u. A JVP runs the forward-mode attention kernel
(models/attention.forward_mode), whose primal output is reverse-differentiable. (t, r): two logit-normal draws
sorted so that t >= r, then r = t for a fraction objective.flow_share of the batch (flow matching: u(z, t, t) = v).
Loss: sg(w) ||u - sg(u_tgt)||^2 with the adaptive weight w = 1 / (||delta||^2 + c)^p, ||delta||^2 summed over
dimensions (paper Eq. 9-10; p = objective.norm_p, c = objective.norm_c).
The network needs the second time input (model.second_time: it embeds t - r besides t).
Sampling: sampling.MEANFLOW (1 NFE: x = e - u(e, 0, 1); 2 NFE through t = 0.5).

Classifier-free guidance in the target (paper Eq. 13-14, its appendix's kappa form; official meanflow.py
MeanFlow.guidance_fn), for class-conditional runs: v_g = omega v + (1 - omega - kappa) u(z, t, t | none)
+ kappa u(z, t, t | c) for t in objective.cfg_interval (v_g = v outside it), the network's velocities u(z, t, t) taken
at the current parameters without gradient or dropout; the loss drops each label with probability
objective.class_dropout, and a dropped label's target is the unguided v. omega = 1, kappa = 0 (the defaults):
v_g = v. The JVP tangent is v_g, as in the official code.

Defaults of the paper (Table 4 / its appendix; ImageNet-256): logit-normal (-0.4, 1.0), r != t for 25% of the
batch (flow_share = 0.75), p = 1, c = 1e-3 (the paper's text; the official code's norm_eps is 0.01); CIFAR-10 (UNet):
logit-normal (-2.0, 2.0), r != t for 75% (flow_share = 0.25), p = 0.75.
"""

import jax
import jax.numpy as jnp

from cm_jax import sampling
from cm_jax.models.apply import NULL_LABEL, network, null_condition, takes_second_time
from cm_jax.models.attention import forward_mode
from cm_jax.objectives.base import Objective, labels
from cm_jax.objectives.continuous import JVP_DTYPES, float32_model
from cm_jax.objectives.flow_matching import check_flow_matching
from cm_jax.parameterization import FlowMatching, bcast

KEYS = {'name', 'p_mean', 'p_std', 'flow_share', 'norm_p', 'norm_c'}
# The optional keys and their defaults (guidance off): cfg_omega (omega), cfg_kappa (kappa), cfg_interval
# ((t_start, t_end), the times guided), class_dropout (the label-drop rate of class-conditional runs; official 0.1).
# jvp_dtype: the dtype of the JVP ('float32' | 'model', the module docstring).
OPTIONAL = {'cfg_omega': 1.0, 'cfg_kappa': 0.0, 'cfg_interval': (0.0, 1.0), 'class_dropout': 0.1,
            'jvp_dtype': 'float32'}



def sample_t_r(rng, batch: int, p_mean, p_std, flow_share, fm: FlowMatching = FlowMatching()):
  """(t, r) [B]: two logit-normal draws sorted so that t >= r; r = t with probability flow_share."""
  rng_a, rng_b, rng_share = jax.random.split(rng, 3)
  a, b = (fm.sample_t(k, (batch,), p_mean, p_std) for k in (rng_a, rng_b))
  t, r = jnp.maximum(a, b), jnp.minimum(a, b)
  return t, jnp.where(jax.random.uniform(rng_share, (batch,)) < flow_share, t, r)


def draw(rng, x, obj, fm: FlowMatching, conditional: bool):
  """The loss's random draws: (t, r) (`sample_t_r`), e ~ N(0, I) like x, and the dropped labels [B] bool (None
  for unconditional data), each label dropped with probability objective.class_dropout."""
  rng_t, rng_e, rng_drop = jax.random.split(rng, 3)
  t, r = sample_t_r(rng_t, x.shape[0], obj.p_mean, obj.p_std, obj.flow_share, fm)
  drop = jax.random.uniform(rng_drop, (x.shape[0],)) < obj.class_dropout if conditional else None
  return t, r, jax.random.normal(rng_e, x.shape), drop


def drop_labels(cond, drop):
  """The labels with the dropped ones set to the null label (None stays None)."""
  return None if cond is None else jnp.where(drop, NULL_LABEL, cond)


def check_guidance_interval(key: str, interval) -> tuple[float, float]:
  """(lo, hi) with 0 <= lo <= hi <= 1, or a ValueError naming objective.<key>."""
  lo, hi = (float(a) for a in interval)
  if not 0.0 <= lo <= hi <= 1.0:
    raise ValueError(f'objective.{key}={tuple(interval)} must be a time interval (lo, hi) with 0 <= lo <= hi <= 1.')
  return lo, hi


def guided_velocity(v_fn, z, t, v, cond, omega, kappa, interval):
  """v_g = omega v + (1 - omega - kappa) v_fn(z, t, none) + kappa v_fn(z, t, cond) for t in interval = (lo, hi),
  v outside it; v_fn(z, t, cond) is the network's velocity u(z, t, t | cond)."""
  inside = (t >= interval[0]) & (t <= interval[1])
  w, k = jnp.where(inside, omega, 1.0), jnp.where(inside, kappa, 0.0)
  v_g = bcast(w, v) * v + bcast(1.0 - w - k, v) * v_fn(z, t, null_condition(cond))
  return v_g + bcast(k, v) * v_fn(z, t, cond) if kappa else v_g


def meanflow_target(u_fn, z, r, t, v):
  """(u(z, r, t), du/dt, u_tgt = v - (t - r) du/dt) with du/dt = jax.jvp of u_fn along (dz, dr, dt) = (v, 0, 1)."""
  u, dudt = jax.jvp(u_fn, (z, r, t), (v, jnp.zeros_like(r), jnp.ones_like(t)))
  return u, dudt, v - bcast(t - r, v) * dudt


def jvp_networks(model, jvp_dtype: str):
  """(the network of u, the network of a separate du/dt pass or None): None, so ONE jax.jvp of the forward-mode
  network gives both, when the JVP may run in the network's dtype (jvp_dtype='model', or a float32 network); else
  (model, its float32 forward-mode clone)."""
  if jvp_dtype == 'model' or jnp.dtype(getattr(model, 'dtype', jnp.float32)) == jnp.float32:
    return forward_mode(model), None
  return model, forward_mode(float32_model(model))


def average_velocity(net, jvp_net, params, z, r, t, tangent):
  """(u(z, r, t), sg(du/dt)), du/dt = jax.jvp of u along (dz, dr, dt) = (tangent, 0, 1); net(p), jvp_net(p): the u_fn
  of parameters p (`jvp_networks`). jvp_net None: one jax.jvp of net(params), its primal the trained u; else du/dt
  from jvp_net(sg(params)) and u from a second forward, net(params)(z, r, t)."""
  if jvp_net is None:
    u, dudt, _ = meanflow_target(net(params), z, r, t, tangent)
  else:
    _, dudt, _ = meanflow_target(jvp_net(jax.lax.stop_gradient(params)), z, r, t, tangent)
    u = net(params)(z, r, t)
  return u, jax.lax.stop_gradient(dudt)


def adaptive_weight(sq_norm, p, c):
  """w = 1 / (||delta||^2 + c)^p (stop-gradient): sg(w) ||delta||^2 is the loss ||delta||^(2 (1 - p)) in value."""
  return jax.lax.stop_gradient(1.0 / (sq_norm + c) ** p)


def weighted_sq(delta, p, c):
  """(sg(w) ||delta||^2 [B], ||delta||^2 [B], w [B]): the adaptively weighted squared norm per example."""
  sq = jnp.sum(jnp.reshape(delta, (delta.shape[0], -1)) ** 2, axis=-1)
  w = adaptive_weight(sq, p, c)
  return w * sq, sq, w


def two_time(fm: FlowMatching, net):
  """u(z, r, t) of a second-time network: F(z, c_noise(t), interval = t - r)."""
  return lambda z, r, t: net(z, fm.c_noise(t), t - r)


def check_two_time(config, model, fm, name: str) -> None:
  """The checks of a two-time objective: flow matching, a second-time network, the r = t share, p and c, and for a
  class-conditional run no network label dropout (the objective drops the labels, objective.class_dropout)."""
  check_flow_matching(config, fm, name)
  obj = config.objective
  if not takes_second_time(model):
    raise ValueError(f"objective.name={name!r} trains a two-time network u(z_t, r, t): set model.second_time=True "
                     '(the network embeds the interval t - r).')
  if not 0.0 <= obj.flow_share <= 1.0:
    raise ValueError(f'objective.flow_share={obj.flow_share} (the share of r = t samples) must be in [0, 1].')
  if not obj.norm_c > 0 or obj.norm_p < 0:
    raise ValueError(f'objective.norm_c={obj.norm_c} must be positive and objective.norm_p={obj.norm_p} >= 0.')
  if obj.jvp_dtype not in JVP_DTYPES:
    raise ValueError(f"objective.jvp_dtype={obj.jvp_dtype!r}; expected 'float32' (the JVP in float32 whatever the "
                     "network's dtype) or 'model' (in model.dtype).")
  if not 0.0 <= obj.class_dropout < 1.0:
    raise ValueError(f"objective.class_dropout={obj.class_dropout} must be in [0, 1).")
  if getattr(model, 'label_dropout', 0.0) > 0:
    raise ValueError(f'model.label_dropout={model.label_dropout}: objective.name={name!r} drops the labels itself '
                     '(objective.class_dropout, with the unguided target for a dropped label); set '
                     'model.label_dropout=0.')


def make_meanflow(config, model, fm: FlowMatching) -> Objective:
  """sg(w) ||u_theta(z_t, r, t) - sg(v_g - (t - r) du_theta/dt)||^2 (module docstring); sampled by sampling.MEANFLOW."""
  check_two_time(config, model, fm, 'meanflow')
  obj = config.objective
  omega, kappa = float(obj.cfg_omega), float(obj.cfg_kappa)
  interval = check_guidance_interval('cfg_interval', obj.cfg_interval)
  conditional = config.model.get('num_classes', 0) > 0
  guiding = omega != 1.0 or kappa != 0.0
  if guiding and not conditional:
    raise ValueError(f'objective.cfg_omega={omega}, cfg_kappa={kappa} guide the target with the unconditional '
                     'velocity, which needs class labels: set model.num_classes > 0, or cfg_omega=1, cfg_kappa=0.')
  u_model, jvp_model = jvp_networks(model, obj.jvp_dtype)

  def loss(params, extra, inputs, batch, rng, step):
    del extra, inputs, step
    x = batch['image']
    cond = labels(batch, config.model)
    rng_draw, rng_net = jax.random.split(rng)
    t, r, e, drop = draw(rng_draw, x, obj, fm, cond is not None)
    z, v = fm.noise(x, e, t), fm.target_velocity(x, e)
    params_sg = jax.lax.stop_gradient(params)
    if guiding:
      v_fn = lambda z, t, c: two_time(fm, network(model, params_sg, c))(z, t, t)
      v = jnp.where(bcast(drop, v), v, guided_velocity(v_fn, z, t, v, cond, omega, kappa, interval))
    cond = drop_labels(cond, drop)
    net = lambda m: None if m is None else lambda p: two_time(fm, network(m, p, cond, rng_net))
    u, dudt = average_velocity(net(u_model), net(jvp_model), params, z, r, t, v)
    u_tgt = jax.lax.stop_gradient(v - bcast(t - r, v) * dudt)
    weighted, sq, w = weighted_sq(u - u_tgt, obj.norm_p, obj.norm_c)
    loss = jnp.mean(weighted)
    return loss, {'loss': loss, 'mse': jnp.mean(sq) / (z.size // z.shape[0]), 'adaptive_weight': jnp.mean(w),
                  'dudt_norm': jnp.mean(jnp.sqrt(jnp.sum(jnp.reshape(dudt, (x.shape[0], -1)) ** 2, -1)))}

  return Objective(loss=loss, sampler=sampling.MEANFLOW)
