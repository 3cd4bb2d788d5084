"""Samplers: the EDM Heun teacher sampler and one-/multi-step consistency sampling (CM paper, Algorithm 1)."""

import jax
import jax.numpy as jnp

from cm_jax import schedules
from cm_jax import solvers
from cm_jax.objectives.base import network
from cm_jax.parameterization import EDM


def consistency_multistep(f, z, sigmas, noise_rng, sigma_min):
  """x <- f(T z, T); for each later tau: x <- f(x + sqrt(tau^2 - eps^2) z', tau).

  `f(x, sigma)` takes per-sample sigma; `sigmas` is the decreasing list [T, tau_1, ...]; z ~ N(0, I).
  """
  batch = z.shape[0]
  x = f(sigmas[0] * z, jnp.full((batch,), sigmas[0]))
  for k, tau in enumerate(sigmas[1:]):
    noise = jax.random.normal(jax.random.fold_in(noise_rng, k), z.shape)
    x = f(x + jnp.sqrt(tau**2 - sigma_min**2) * noise, jnp.full((batch,), tau))
  return x


def make_sample_fn(config, model, edm: EDM, kind: str):
  """Returns sample(params, rng, cond, shape, num_steps) -> samples for a diffusion or consistency model.

  Diffusion models use EDM's Heun sampler with `num_steps` grid points (2 num_steps - 1 evaluations);
  consistency models use `num_steps` evaluations at [sigma_max] + config.sampling.mid_sigmas[:num_steps - 1].
  """
  mid_sigmas = tuple(config.sampling.mid_sigmas)

  def sample(params, rng, cond, shape, num_steps):
    rng_z, rng_noise = jax.random.split(rng)
    z = jax.random.normal(rng_z, shape)
    net = network(model, params, cond)
    if kind == 'diffusion':
      sigmas = schedules.karras_sigmas(num_steps, edm.sigma_min, edm.sigma_max, config.parameterization.rho)[::-1]
      return solvers.edm_sampler(lambda x, s: edm.denoise(net, x, s), edm.sigma_max * z, sigmas)
    if num_steps - 1 > len(mid_sigmas):
      raise ValueError(f'{num_steps}-step sampling needs {num_steps - 1} sampling.mid_sigmas; '
                       f'the config has {mid_sigmas}.')
    sigmas = (edm.sigma_max,) + mid_sigmas[:num_steps - 1]
    return consistency_multistep(lambda x, s: edm.consistency(net, x, s), z, sigmas, rng_noise, edm.sigma_min)

  return sample
