"""Samplers. Each objective names the one its models are drawn with (`Objective.sampler`), so the trainer asks the
objective how to sample and never branches on the method:

  EDM_HEUN     diffusion models on EDM levels (EDM and TrigFlow teachers): EDM's Heun sampler.
  CONSISTENCY  consistency models on EDM / TrigFlow: one step, or CM's multistep sampling (Algorithm 1); with
               sampling.clip_denoised each x0 estimate is clamped to [-1, 1].
  DDIM         VP (DDPM) diffusion models: deterministic DDIM on the trailing grid, classifier-free guidance optional.
  LCM          latent consistency models on VP: LCM's multistep sampling (predict x0, re-noise to the next timestep).
  FLOW_ODE     flow-matching models: Euler (or Heun, sampling.flow_solver) on the uniform grid from t = 1 to 0.
  MEANFLOW     two-time average-velocity models u(z, r, t): z_r = z_t - (t - r) u on the uniform grid from t = 1
               (1 step: x = z - u(z, 0, 1); 2 steps: through t = 0.5).

A sampler's `build(config, model, process)` returns sample(params, rng, cond, shape, num_steps, guidance=None).
"""

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from cm_jax import schedules
from cm_jax import solvers
from cm_jax.models.apply import can_guide, guided, network, takes_guidance


@dataclasses.dataclass(frozen=True)
class Sampler:
  """How a method's model is sampled.

  label(num_steps) -> how the quality table names its rows ('EDM Heun', '2-step', 'DDIM 50-step').
  build(config, model, process) -> sample(params, rng, cond, shape, num_steps, guidance=None).
  eval_steps(config) -> the step counts of --mode=sample and of the quality table.
  grid_steps(config) -> the step count of the periodic sample grids.
  nfe(config, num_steps) -> network evaluations per sample.
  diffusion: it integrates a diffusion model's PF-ODE, so the run can be a distillation teacher.
  """
  label: Callable
  build: Callable
  eval_steps: Callable
  grid_steps: Callable
  nfe: Callable
  diffusion: bool = False


def _guidance_input(config, model) -> float:
  """sampling.guidance_scale, the s given to a network with a guidance input (model.guidance_embedding)."""
  scale = float(config.sampling.get('guidance_scale', 1.0))  # absent from runs written before the key
  if scale != 1.0 and not takes_guidance(model):
    raise ValueError(f'sampling.guidance_scale={scale} needs a network with a guidance input '
                     '(model.guidance_embedding=True, trained by sCD or LCD with a range objective.guidance_scale).')
  return scale


def _per_example_guidance(model, default: float, guidance, batch: int):
  """s [B] for a guidance-input network: `guidance` (scalar or [B]) when given, else the config's default."""
  if guidance is not None and not takes_guidance(model):
    raise ValueError('A guidance scale was passed to the sampler of a network without a guidance input '
                     '(model.guidance_embedding=False).')
  return jnp.broadcast_to(jnp.asarray(default if guidance is None else guidance, jnp.float32), (batch,))


def _per_sample(t, batch: int, dtype=jnp.float32):
  return jnp.full((batch,), t, dtype)


# ----------------------------------------------------------------------------------------------------------
# EDM levels: EDM's Heun sampler and consistency sampling (EDM and TrigFlow processes).
# ----------------------------------------------------------------------------------------------------------
def consistency_multistep(process, f, z, ts, noise_rng):
  """x <- f(prior(z), t_max); for each later t: x <- f(renoise(x, z', t), t), z' ~ N(0, I) fresh at each step.

  `ts` is the decreasing list [t_max, t_1, ...] in the process's time; `f(x, t)` takes per-sample t; z ~ N(0, I).
  EDM: prior = T z, renoise = x + sqrt(t^2 - eps^2) z'; TrigFlow: prior = sd z, renoise = cos(t) x + sin(t) sd z'.
  """
  x = f(process.prior(z), _per_sample(ts[0], z.shape[0]))
  for k, t in enumerate(ts[1:]):
    noise = jax.random.normal(jax.random.fold_in(noise_rng, k), z.shape)
    x = f(process.renoise(x, noise, _per_sample(t, z.shape[0])), _per_sample(t, z.shape[0]))
  return x


def clip_denoised(config) -> bool:
  """x0 <- clip(x0, -1, 1) after every consistency-function call (sampling.clip_denoised, as the CM code does).

  Applies to every x0 estimate of multistep sampling and editing, the last included; False for runs written before
  the key. A latent run is refused: its samples are latents, which have no data range.
  """
  clip = bool(config.sampling.get('clip_denoised', False))
  if clip and config.get('latent', {}).get('autoencoder'):
    raise ValueError('sampling.clip_denoised=True clamps pixels to [-1, 1], but this run samples latents '
                     f'(latent.autoencoder={config.latent.autoencoder!r}): set it to False.')
  return clip


def consistency_fn(process, net, clip: bool):
  """f(x, t) = process.consistency(net, x, t), or clip(f(x, t), -1, 1) with `clip` (sampling.clip_denoised)."""
  def f(x, t):
    x0 = process.consistency(net, x, t)
    return jnp.clip(x0, -1.0, 1.0) if clip else x0
  return f


def mid_sigmas(config, process) -> tuple:
  """The levels after sigma_max of multistep sampling: sampling.mid_sigmas, or for sampling.mid_indices (the CM
  code's ts, counted from sigma_max) sigma = karras_sigma(N - 1 - i, N) on the N = sampling.index_grid_size grid."""
  s = config.sampling
  if not s.mid_indices:
    sigmas = tuple(s.mid_sigmas)
    if not all(process.sigma_min < a < process.sigma_max for a in sigmas) or sorted(sigmas, reverse=True) != list(
        sigmas):
      raise ValueError(f'sampling.mid_sigmas={sigmas} must decrease strictly inside (sigma_min, sigma_max) = '
                       f'({process.sigma_min}, {process.sigma_max}).')
    return sigmas
  if s.mid_sigmas:
    raise ValueError(f'Set one of sampling.mid_sigmas={tuple(s.mid_sigmas)} and sampling.mid_indices='
                     f'{tuple(s.mid_indices)}, not both.')
  n, indices = s.index_grid_size, tuple(s.mid_indices)
  if not all(a < b for a, b in zip((0,) + indices, indices + (n - 1,))):
    raise ValueError(f'sampling.mid_indices={indices} must increase strictly within (0, '
                     f'sampling.index_grid_size - 1 = {n - 1}).')
  grid = schedules.karras_sigmas(n, process.sigma_min, process.sigma_max, config.parameterization.rho)
  return tuple(float(grid[n - 1 - i]) for i in indices)


def _edm_heun(config, model, process):
  """EDM's Heun sampler with `num_steps` Karras grid points (2 num_steps - 1 evaluations) on the denoiser at EDM
  levels, D(x_sigma, sigma) = denoise(x_from_sigma(x_sigma, sigma), t_from_sigma(sigma))."""
  default = _guidance_input(config, model)

  def sample(params, rng, cond, shape, num_steps, guidance=None):
    net = network(model, params, cond, guidance=_per_example_guidance(model, default, guidance, shape[0]))
    grid = schedules.karras_sigmas(num_steps, process.sigma_min, process.sigma_max, config.parameterization.rho)
    denoise = lambda x, sigma: process.denoise(net, process.x_from_sigma(x, sigma), process.t_from_sigma(sigma))
    z = jax.random.normal(jax.random.split(rng)[0], shape)
    return solvers.edm_sampler(denoise, process.sigma_max * z, grid[::-1])

  return sample


def _consistency(config, model, process):
  """`consistency_multistep` with `num_steps` evaluations at t_max and t_from_sigma of
  mid_sigmas(config)[:num_steps - 1] (sCM's 2-step t = 1.1 is the level sigma = sd tan 1.1), each output clamped to
  [-1, 1] with sampling.clip_denoised."""
  sigmas = mid_sigmas(config, process)
  mids = tuple(float(process.t_from_sigma(s)) for s in sigmas)
  default = _guidance_input(config, model)
  clip = clip_denoised(config)

  def sample(params, rng, cond, shape, num_steps, guidance=None):
    if num_steps - 1 > len(mids):
      raise ValueError(f'{num_steps}-step sampling needs {num_steps - 1} sampling.mid_sigmas (or mid_indices); '
                       f'the config gives {sigmas}.')
    net = network(model, params, cond, guidance=_per_example_guidance(model, default, guidance, shape[0]))
    rng_z, rng_noise = jax.random.split(rng)
    return consistency_multistep(process, consistency_fn(process, net, clip), jax.random.normal(rng_z, shape),
                                 (process.t_max,) + mids[:num_steps - 1], rng_noise)

  return sample


# ----------------------------------------------------------------------------------------------------------
# VP timesteps: DDIM (teachers) and LCM's multistep sampling (latent consistency models).
# ----------------------------------------------------------------------------------------------------------
def guided_prediction(process, model, params, cond, x, t, scale):
  """(x0_hat, eps_hat) of a VP network with classifier-free guidance (models.apply.guided; scale None: none)."""
  return guided(lambda labels: process.predict(network(model, params, labels), x, t), cond, scale)


def _ddim_guidance(config, model):
  """sampling.guidance_scale as DDIM's classifier-free guidance scale (None: no guidance, one evaluation per step)."""
  scale = float(config.sampling.get('guidance_scale', 1.0))
  if scale == 1.0:
    return None
  if not can_guide(model):
    raise ValueError(f'sampling.guidance_scale={scale} is a classifier-free guidance scale for DDIM and needs a '
                     'class-conditional network trained with model.label_dropout > 0.')
  return scale


def _ddim(config, model, vp):
  """DDIM (eta = 0) along ddim_timesteps(num_steps): x <- alpha_prev x0_hat + sigma_prev eps_hat, the last step to
  t = -1 (x0_hat); x_{999} ~ N(0, I). With a guidance scale s: CFG on (x0_hat, eps_hat), two evaluations per step."""
  default = _ddim_guidance(config, model)

  def sample(params, rng, cond, shape, num_steps, guidance=None):
    if guidance is not None and not can_guide(model):
      raise ValueError('A guidance scale was passed to DDIM for a network without an unconditional branch '
                       '(model.num_classes > 0 and model.label_dropout > 0).')
    scale = default if guidance is None else guidance
    ts = jnp.asarray(schedules.ddim_timesteps(num_steps, vp.num_timesteps))
    prev = jnp.concatenate([ts[1:], jnp.full((1,), -1, jnp.int32)])

    def step(x, pair):
      t, t_prev = (_per_sample(a, shape[0], jnp.int32) for a in pair)
      x0, eps = guided_prediction(vp, model, params, cond, x, t, scale)
      return vp.ddim_step(x0, eps, t_prev), None

    x, _ = jax.lax.scan(step, jax.random.normal(jax.random.split(rng)[0], shape), (ts, prev))
    return x

  return sample


def _lcm(config, model, vp):
  """LCM multistep: x0 <- f(z, tau_0), z ~ N(0, I); for each later tau: x0 <- f(alpha x0 + sigma z', tau) with fresh
  z'; the timesteps are schedules.lcm_timesteps on the objective's skipping grid (objective.skip)."""
  default = _guidance_input(config, model)
  skip = int(config.objective.skip)
  schedules.skipping_grid(vp.num_timesteps, skip)  # a bad skip fails now

  def sample(params, rng, cond, shape, num_steps, guidance=None):
    net = network(model, params, cond, guidance=_per_example_guidance(model, default, guidance, shape[0]))
    ts = schedules.lcm_timesteps(num_steps, vp.num_timesteps, skip)
    rng_z, rng_noise = jax.random.split(rng)
    f = lambda x, t: vp.consistency(net, x, _per_sample(t, shape[0], jnp.int32))
    x0 = f(jax.random.normal(rng_z, shape), ts[0])
    for k, t in enumerate(ts[1:]):
      noise = jax.random.normal(jax.random.fold_in(rng_noise, k), shape)
      x0 = f(vp.noise(x0, noise, _per_sample(t, shape[0], jnp.int32)), t)
    return x0

  return sample


# ----------------------------------------------------------------------------------------------------------
# The flow-matching process z_t = (1 - t) x + t e: the ODE of a velocity model and MeanFlow's average velocity.
# ----------------------------------------------------------------------------------------------------------
FLOW_SOLVERS = ('euler', 'heun')


def flow_solver(config) -> str:
  """sampling.flow_solver: 'euler' or 'heun' for the flow-matching ODE."""
  solver = config.sampling.flow_solver
  if solver not in FLOW_SOLVERS:
    raise ValueError(f'sampling.flow_solver={solver!r}; expected one of {FLOW_SOLVERS}.')
  return solver


def _flow_ode(config, model, fm):
  """z_1 = e ~ N(0, I), then `num_steps` Euler (or Heun) steps of dz/dt = v(z, t) on the uniform grid 1 -> 0."""
  solver = flow_solver(config)

  def sample(params, rng, cond, shape, num_steps, guidance=None):
    del guidance
    net = network(model, params, cond)
    velocity = lambda z, t: fm.velocity(net, z, _per_sample(t, shape[0]))
    step = solvers.flow_heun_step if solver == 'heun' else solvers.flow_euler_step
    ts = jnp.linspace(1.0, 0.0, num_steps + 1)
    z = fm.prior(jax.random.normal(jax.random.split(rng)[0], shape))
    z, _ = jax.lax.scan(lambda z, pair: (step(velocity, z, *pair), None), z, (ts[:-1], ts[1:]))
    return z

  return sample


def meanflow_multistep(u, z, num_steps: int):
  """z <- z - (t - r) u(z, r, t) along the uniform grid t = 1, 1 - 1/n, ..., 0 (n = num_steps network evaluations);
  `u(z, r, t)` takes per-sample r, t [B]."""
  ts = [1.0 - k / num_steps for k in range(num_steps)] + [0.0]
  for t, r in zip(ts[:-1], ts[1:]):
    z = z - (t - r) * u(z, _per_sample(r, z.shape[0]), _per_sample(t, z.shape[0]))
  return z


def _meanflow(config, model, fm):
  """`meanflow_multistep` from z_1 = e ~ N(0, I): 1 step x = e - u(e, 0, 1); 2 steps through t = 0.5. A network with a
  guidance input (iMF: the CFG scale omega as a condition) is given sampling.guidance_scale, or `guidance`."""
  default = _guidance_input(config, model) if takes_guidance(model) else 1.0

  def sample(params, rng, cond, shape, num_steps, guidance=None):
    net = network(model, params, cond, guidance=_per_example_guidance(model, default, guidance, shape[0]))
    u = lambda z, r, t: net(z, fm.c_noise(t), t - r)
    return meanflow_multistep(u, fm.prior(jax.random.normal(jax.random.split(rng)[0], shape)), num_steps)

  return sample


_teacher_steps = lambda config: (int(config.sampling.teacher_steps),)
_one_per_step = lambda config, num_steps: num_steps
_steps = lambda num_steps: f'{num_steps}-step'
_guided_nfe = lambda config, num_steps: num_steps * (1 if config.sampling.guidance_scale == 1.0 else 2)

EDM_HEUN = Sampler(lambda num_steps: 'EDM Heun', _edm_heun, eval_steps=_teacher_steps,
                   grid_steps=lambda c: c.sampling.teacher_steps,
                   nfe=lambda config, num_steps: solvers.edm_sampler_nfe(num_steps), diffusion=True)
CONSISTENCY = Sampler(_steps, _consistency, eval_steps=lambda c: tuple(c.eval.steps), grid_steps=lambda c: 1,
                      nfe=_one_per_step)
DDIM = Sampler(lambda num_steps: f'DDIM {num_steps}-step', _ddim, eval_steps=_teacher_steps,
               grid_steps=lambda c: c.sampling.teacher_steps, nfe=_guided_nfe, diffusion=True)
LCM = Sampler(_steps, _lcm, eval_steps=lambda c: tuple(c.eval.steps), grid_steps=lambda c: 1, nfe=_one_per_step)
FLOW_ODE = Sampler(lambda num_steps: f'flow ODE {num_steps}-step', _flow_ode, eval_steps=_teacher_steps,
                   grid_steps=lambda c: c.sampling.teacher_steps,
                   nfe=lambda config, num_steps: num_steps * (2 if flow_solver(config) == 'heun' else 1))
MEANFLOW = Sampler(_steps, _meanflow, eval_steps=lambda c: tuple(c.eval.steps), grid_steps=lambda c: 1,
                   nfe=_one_per_step)
