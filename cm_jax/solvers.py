"""Probability-flow ODE solvers in EDM noise levels: dx/dsigma = (x - D(x, sigma)) / sigma (and, at the end, the
flow-matching ODE's Euler and Heun steps).

`denoise(x, sigma)` is any denoiser with per-sample sigma [B]; steps accept per-sample (traced) levels.
"""

import jax
import jax.numpy as jnp

from cm_jax.parameterization import bcast


def pf_ode_derivative(denoise, x, sigma):
  """dx/dsigma = (x - D(x, sigma)) / sigma."""
  return (x - denoise(x, sigma)) / bcast(sigma, x)


def euler_step(denoise, x, sigma, sigma_next):
  """x' = x + (sigma' - sigma) dx/dsigma (one network evaluation)."""
  return x + bcast(sigma_next - sigma, x) * pf_ode_derivative(denoise, x, sigma)


def heun_step(denoise, x, sigma, sigma_next):
  """Heun's second-order step x' = x + h (d(x, sigma) + d(x_euler, sigma')) / 2, for sigma' > 0 (two evaluations)."""
  d = pf_ode_derivative(denoise, x, sigma)
  h = bcast(sigma_next - sigma, x)
  d_next = pf_ode_derivative(denoise, x + h * d, sigma_next)
  return x + h * 0.5 * (d + d_next)


def heun_solve(denoise, x, sigmas):
  """Integrates the PF-ODE with Heun steps along a decreasing grid of positive levels (2 (N - 1) evaluations)."""
  sigmas = jnp.asarray(sigmas, jnp.float32)
  per_sample = lambda s: jnp.full((x.shape[0],), s)

  def body(x, pair):
    s, s_next = pair
    return heun_step(denoise, x, per_sample(s), per_sample(s_next)), None

  x, _ = jax.lax.scan(body, x, (sigmas[:-1], sigmas[1:]))
  return x


def edm_sampler(denoise, x_init, sigmas):
  """EDM's deterministic sampler: Heun along the decreasing grid `sigmas`, then one Euler step to 0.

  With 18 grid points this is 17 Heun steps + 1 Euler step = 35 network evaluations.
  `x_init` must already be scaled to the first level (x = sigma_max z).
  """
  x = heun_solve(denoise, x_init, sigmas)
  last = jnp.full((x.shape[0],), jnp.asarray(sigmas, jnp.float32)[-1])
  return euler_step(denoise, x, last, jnp.zeros_like(last))


def edm_sampler_nfe(num_points: int) -> int:
  """Network evaluations of `edm_sampler` with `num_points` grid points: 2 (N - 1) + 1."""
  return 2 * (num_points - 1) + 1


# The flow-matching ODE dz/dt = v(z, t) (z_t = (1 - t) x + t e), integrated from t = 1 towards 0; `velocity(z, t)`
# takes a scalar t.
def flow_euler_step(velocity, z, t, t_next):
  """z' = z + (t' - t) v(z, t) (one evaluation)."""
  return z + (t_next - t) * velocity(z, t)


def flow_heun_step(velocity, z, t, t_next):
  """Heun: z' = z + (t' - t) (v(z, t) + v(z_euler, t')) / 2 (two evaluations; v is defined at t' = 0)."""
  d = velocity(z, t)
  d_next = velocity(z + (t_next - t) * d, t_next)
  return z + (t_next - t) * 0.5 * (d + d_next)
