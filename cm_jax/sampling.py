"""Samplers: the EDM Heun teacher sampler and one-/multi-step consistency sampling (CM paper, Algorithm 1), for any
noise process of parameterization.py (EDM noise levels or TrigFlow time, sCM)."""

import jax
import jax.numpy as jnp

from cm_jax import schedules
from cm_jax import solvers
from cm_jax.objectives.base import network, takes_guidance


def consistency_multistep(process, f, z, ts, noise_rng):
  """x <- f(prior(z), t_max); for each later t: x <- f(renoise(x, z', t), t), z' ~ N(0, I) fresh at each step.

  `ts` is the decreasing list [t_max, t_1, ...] in the process's time; `f(x, t)` takes per-sample t; z ~ N(0, I).
  EDM: prior = T z, renoise = x + sqrt(t^2 - eps^2) z'; TrigFlow: prior = sd z, renoise = cos(t) x + sin(t) sd z'.
  """
  per_sample = lambda t: jnp.full((z.shape[0],), t, jnp.float32)
  x = f(process.prior(z), per_sample(ts[0]))
  for k, t in enumerate(ts[1:]):
    noise = jax.random.normal(jax.random.fold_in(noise_rng, k), z.shape)
    x = f(process.renoise(x, noise, per_sample(t)), per_sample(t))
  return x


def mid_sigmas(config, process) -> tuple:
  """The levels after sigma_max of multistep sampling: sampling.mid_sigmas, or for sampling.mid_indices (the CM
  code's ts, counted from sigma_max) sigma = karras_sigma(N - 1 - i, N) on the N = sampling.index_grid_size grid."""
  s = config.sampling
  if not s.mid_indices:
    return tuple(s.mid_sigmas)
  if s.mid_sigmas:
    raise ValueError(f'Set one of sampling.mid_sigmas={tuple(s.mid_sigmas)} and sampling.mid_indices='
                     f'{tuple(s.mid_indices)}, not both.')
  n, indices = s.index_grid_size, tuple(s.mid_indices)
  if not all(a < b for a, b in zip((0,) + indices, indices + (n - 1,))):
    raise ValueError(f'sampling.mid_indices={indices} must increase strictly within (0, '
                     f'sampling.index_grid_size - 1 = {n - 1}).')
  grid = schedules.karras_sigmas(n, process.sigma_min, process.sigma_max, config.parameterization.rho)
  return tuple(float(grid[n - 1 - i]) for i in indices)


def make_sample_fn(config, model, process, kind: str):
  """Returns sample(params, rng, cond, shape, num_steps, guidance=None) -> samples, for an EDM or TrigFlow `process`.

  Diffusion models: EDM's Heun sampler with `num_steps` Karras grid points (2 num_steps - 1 evaluations) on the
  denoiser at EDM levels, D(x_sigma, sigma) = denoise(x_from_sigma(x_sigma, sigma), t_from_sigma(sigma)).
  Consistency models: `consistency_multistep` with `num_steps` evaluations at t_max and t_from_sigma of
  mid_sigmas(config)[:num_steps - 1] (sCM's 2-step t = 1.1 is the level sigma = sd tan 1.1).
  guidance: the guidance scale s (scalar or [B]) fed to a network with a guidance input (model.guidance_embedding);
  None: sampling.guidance_scale.

  Raises:
    ValueError: sampling.guidance_scale != 1 for a network without a guidance input, or an inconsistent
      sampling.mid_sigmas / mid_indices.
  """
  sigmas = mid_sigmas(config, process)
  mids = tuple(float(process.t_from_sigma(s)) for s in sigmas)
  default_guidance = float(config.sampling.get('guidance_scale', 1.0))  # absent from runs written before the key
  if default_guidance != 1.0 and not takes_guidance(model):
    raise ValueError(f'sampling.guidance_scale={default_guidance} needs a network with a guidance input '
                     '(model.guidance_embedding=True, trained by sCD with a range objective.guidance_scale).')

  def sample(params, rng, cond, shape, num_steps, guidance=None):
    if guidance is not None and not takes_guidance(model):
      raise ValueError('A guidance scale was passed to the sampler of a network without a guidance input '
                       '(model.guidance_embedding=False).')
    s = jnp.broadcast_to(jnp.asarray(default_guidance if guidance is None else guidance, jnp.float32), shape[:1])
    rng_z, rng_noise = jax.random.split(rng)
    z = jax.random.normal(rng_z, shape)
    net = network(model, params, cond, guidance=s)
    if kind == 'diffusion':
      grid = schedules.karras_sigmas(num_steps, process.sigma_min, process.sigma_max, config.parameterization.rho)
      denoise = lambda x, sigma: process.denoise(net, process.x_from_sigma(x, sigma), process.t_from_sigma(sigma))
      return solvers.edm_sampler(denoise, process.sigma_max * z, grid[::-1])
    if num_steps - 1 > len(mids):
      raise ValueError(f'{num_steps}-step sampling needs {num_steps - 1} sampling.mid_sigmas (or mid_indices); '
                       f'the config gives {sigmas}.')
    return consistency_multistep(process, lambda x, t: process.consistency(net, x, t), z,
                                 (process.t_max,) + mids[:num_steps - 1], rng_noise)

  return sample
