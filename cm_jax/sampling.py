"""Samplers: the EDM Heun teacher sampler and one-/multi-step consistency sampling (CM paper, Algorithm 1), in EDM
noise levels or in TrigFlow time (sCM)."""

import jax
import jax.numpy as jnp

from cm_jax import schedules
from cm_jax import solvers
from cm_jax.objectives.base import network
from cm_jax.parameterization import EDM, TrigFlow, bcast


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


def mid_sigmas(config, edm: EDM) -> tuple:
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
  grid = schedules.karras_sigmas(n, edm.sigma_min, edm.sigma_max, config.parameterization.rho)
  return tuple(float(grid[n - 1 - i]) for i in indices)


def make_sample_fn(config, model, edm: EDM, kind: str):
  """Returns sample(params, rng, cond, shape, num_steps) -> samples for a diffusion or consistency model.

  Diffusion models use EDM's Heun sampler with `num_steps` grid points (2 num_steps - 1 evaluations);
  consistency models use `num_steps` evaluations at [sigma_max] + mid_sigmas(config, edm)[:num_steps - 1].
  """
  if isinstance(edm, TrigFlow):
    return make_trigflow_sample_fn(config, model, edm, kind)
  mids = mid_sigmas(config, edm)

  def sample(params, rng, cond, shape, num_steps):
    rng_z, rng_noise = jax.random.split(rng)
    z = jax.random.normal(rng_z, shape)
    net = network(model, params, cond)
    if kind == 'diffusion':
      sigmas = schedules.karras_sigmas(num_steps, edm.sigma_min, edm.sigma_max, config.parameterization.rho)[::-1]
      return solvers.edm_sampler(lambda x, s: edm.denoise(net, x, s), edm.sigma_max * z, sigmas)
    if num_steps - 1 > len(mids):
      raise ValueError(f'{num_steps}-step sampling needs {num_steps - 1} sampling.mid_sigmas (or mid_indices); '
                       f'the config gives {mids}.')
    sigmas = (edm.sigma_max,) + mids[:num_steps - 1]
    return consistency_multistep(lambda x, s: edm.consistency(net, x, s), z, sigmas, rng_noise, edm.sigma_min)

  return sample


def trigflow_multistep(f, z, ts, noise_rng, sigma_data):
  """x <- f(sd z, t_max); for each later t: x <- f(cos(t) x + sin(t) sd z', t).  `ts` = [t_max, t_1, ...], z ~ N(0, I)."""
  batch = z.shape[0]
  x = f(sigma_data * z, jnp.full((batch,), ts[0]))
  for k, t in enumerate(ts[1:]):
    noise = jax.random.normal(jax.random.fold_in(noise_rng, k), z.shape)
    x = f(jnp.cos(t) * x + jnp.sin(t) * sigma_data * noise, jnp.full((batch,), t))
  return x


def make_trigflow_sample_fn(config, model, tf: TrigFlow, kind: str):
  """`make_sample_fn` for TrigFlow models; the sampling levels are EDM sigmas, used at t = arctan(sigma / sd).

  Diffusion: EDM's Heun sampler on the Karras grid with D(x_sigma, sigma) = x0-estimate(cos(t) x_sigma, t).
  Consistency: `trigflow_multistep` at [t_max] + arctan(mid_sigmas / sd) (sCM's 2-step t = 1.1: sigma = sd tan 1.1).
  """
  mids = tuple(float(tf.t_from_sigma(s)) for s in mid_sigmas(config, tf))

  def sample(params, rng, cond, shape, num_steps):
    rng_z, rng_noise = jax.random.split(rng)
    z = jax.random.normal(rng_z, shape)
    net = network(model, params, cond)
    if kind == 'diffusion':
      sigmas = schedules.karras_sigmas(num_steps, tf.sigma_min, tf.sigma_max, config.parameterization.rho)[::-1]
      denoise = lambda x, s: tf.denoise(net, bcast(jnp.cos(tf.t_from_sigma(s)), x) * x, tf.t_from_sigma(s))
      return solvers.edm_sampler(denoise, tf.sigma_max * z, sigmas)
    if num_steps - 1 > len(mids):
      raise ValueError(f'{num_steps}-step sampling needs {num_steps - 1} sampling.mid_sigmas (or mid_indices); '
                       f'the config gives {mids} (as t).')
    return trigflow_multistep(lambda x, t: tf.consistency(net, x, t), z, (tf.t_max,) + mids[:num_steps - 1],
                              rng_noise, tf.sigma_data)

  return sample
