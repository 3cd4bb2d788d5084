"""Latent consistency distillation (LCD, Luo et al. 2023) and latent consistency fine-tuning (LCF) on the VP process.

Both minimise d(f_theta(x_{t_{n+k}}, t_{n+k}; s, c), sg f_theta-(x_hat_{t_n}, t_n; s, c)) over the skipping-step pairs
(t_{n+k}, t_n) of schedules.sample_skipping_pair (k = objective.skip), with x_{t_{n+k}} = alpha x0 + sigma eps, LCM's
consistency function f = c_skip x + c_out x0_hat (VP.consistency) and one dropout key for both calls. They differ in
x_hat_{t_n}:
  LCD: one DDIM step of the teacher's classifier-free-guided PF-ODE from t_{n+k} to t_n,
       x_hat = alpha_n x0_g + sigma_n eps_g, (x0_g, eps_g) = u + s (c - u) with s ~ U[objective.guidance_scale] per
       example (s = 1 + w for LCM's w: s = 1 is the unguided teacher); a student with a guidance input
       (model.guidance_embedding) sees s, as LCM's w-embedding;
  LCF: the one-sample estimate alpha_n x0 + sigma_n eps with the same eps (no teacher); s is fixed, lo = hi.
theta-: the EMA target with rate objective.target_ema (LCM: 0.95), or sg(theta) with 0 (LCM-LoRA).
"""

import jax
import jax.numpy as jnp

from cm_jax import distances
from cm_jax import sampling
from cm_jax import schedules
from cm_jax.models.apply import can_guide, network, without_guidance, without_label_dropout
from cm_jax.objectives.base import Objective, labels, sample_guidance
from cm_jax.parameterization import VP


def _check(config, model, vp, distill: bool):
  obj = config.objective
  if not isinstance(vp, VP):
    raise ValueError(f"objective.name={obj.name!r} needs parameterization.name='vp'.")
  solver_steps = len(schedules.skipping_grid(vp.num_timesteps, obj.skip))
  asked = tuple(config.get('eval', {}).get('steps', ()))
  if any(n > solver_steps for n in asked):  # LCM sampling takes its steps from the solver grid
    raise ValueError(f'eval.steps={asked} asks for {max(asked)}-step sampling, but objective.skip={obj.skip} leaves '
                     f'{solver_steps} solver steps (num_timesteps={vp.num_timesteps} / skip): lower objective.skip or '
                     f'keep eval.steps <= {solver_steps}.')
  if not 0.0 <= obj.target_ema < 1.0:
    raise ValueError(f'objective.target_ema={obj.target_ema} must be in [0, 1).')
  lo, hi = obj.guidance_scale
  if not 0 <= lo <= hi:
    raise ValueError(f'objective.guidance_scale={tuple(obj.guidance_scale)} must be (lo, hi) with 0 <= lo <= hi.')
  if not distill and lo != hi:
    raise ValueError(f'objective.guidance_scale={tuple(obj.guidance_scale)}: LCF has no teacher to guide; give one '
                     'scale (lo = hi), the s its guidance input is fed (1: the unguided flow it is trained on).')
  if distill and (lo, hi) != (1.0, 1.0) and not can_guide(model):
    raise ValueError(f'objective.guidance_scale={tuple(obj.guidance_scale)} needs a class-conditional teacher '
                     'trained with model.label_dropout > 0 (a network where label -1 is the unconditional branch).')
  distances.get_distance(obj.distance)
  if obj.distance == 'lpips':
    raise ValueError("objective.distance='lpips' compares RGB images; a latent consistency loss compares latents: "
                     "use 'l2' or 'pseudo_huber_elementwise'.")


def make_latent_consistency(config, model, vp: VP, distill: bool) -> Objective:
  """LCD (distill) or LCF: the loss of the module docstring."""
  _check(config, model, vp, distill)
  obj = config.objective
  distance, c = distances.get_distance(obj.distance), (float(obj.distance_c) or None)
  guided = distill and tuple(obj.guidance_scale) != (1.0, 1.0)
  student_model = without_label_dropout(model)
  teacher_model = without_guidance(student_model)
  mu = float(obj.target_ema)

  def estimate(inputs, cond, x0, eps, x_t, t, t_prev, s):
    """x_hat at t_prev: the guided teacher's DDIM step (LCD) or alpha x0 + sigma eps (LCF)."""
    if not distill:
      return vp.noise(x0, eps, t_prev)
    x0_g, eps_g = sampling.guided_prediction(vp, teacher_model, inputs['teacher'], cond, x_t, t,
                                             s if guided else None)
    return vp.ddim_step(x0_g, eps_g, t_prev)

  def loss(params, extra, inputs, batch, rng, step):
    del extra, step
    x0 = batch['image']
    cond = labels(batch, config.model)
    rng_t, rng_eps, rng_drop, rng_s = jax.random.split(rng, 4)
    t, t_prev = schedules.sample_skipping_pair(rng_t, x0.shape[0], vp.num_timesteps, obj.skip)
    eps = jax.random.normal(rng_eps, x0.shape)
    s = sample_guidance(rng_s, obj.guidance_scale, x0.shape[0])
    x_t = vp.noise(x0, eps, t)
    x_hat = jax.lax.stop_gradient(estimate(inputs, cond, x0, eps, x_t, t, t_prev, s))
    theta_minus = jax.lax.stop_gradient(params if mu == 0.0 else inputs['target'])
    pred = vp.consistency(network(student_model, params, cond, rng_drop, guidance=s), x_t, t)
    target = jax.lax.stop_gradient(
        vp.consistency(network(student_model, theta_minus, cond, rng_drop, guidance=s), x_hat, t_prev))
    loss = jnp.mean(distance(pred, target, c, inputs))
    return loss, {'loss': loss, 'guidance_scale': jnp.mean(s)}

  return Objective(loss=loss, sampler=sampling.LCM, target_rate=None if mu == 0.0 else (lambda step: jnp.float32(mu)),
                   feeds_guidance=True,
                   distils='vp' if distill else None)


make_lcd = lambda config, model, vp: make_latent_consistency(config, model, vp, distill=True)
make_lcf = lambda config, model, vp: make_latent_consistency(config, model, vp, distill=False)
