"""Discretisations, curricula and samplers of noise levels.

Every function is pure and takes the (possibly traced) training step, so a curriculum that changes the
number of discretisation steps N(k) never changes a shape and never recompiles the train step.
Grid indices are 0-based here: sigma_0 = sigma_min < sigma_1 < ... < sigma_{N-1} = sigma_max.
"""

import jax
import jax.numpy as jnp
import numpy as np


def karras_sigma(i, num_scales, sigma_min=0.002, sigma_max=80.0, rho=7.0):
  """sigma_i = (eps^(1/rho) + i/(N-1) (T^(1/rho) - eps^(1/rho)))^rho for i = 0..N-1 (traced i and N allowed)."""
  lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
  frac = jnp.asarray(i, jnp.float32) / (jnp.asarray(num_scales, jnp.float32) - 1.0)
  return (lo + frac * (hi - lo)) ** rho


def karras_sigmas(num_scales: int, sigma_min=0.002, sigma_max=80.0, rho=7.0):
  """The whole Karras grid [sigma_0, ..., sigma_{N-1}] for a static N, increasing."""
  return karras_sigma(jnp.arange(num_scales), num_scales, sigma_min, sigma_max, rho)


def ict_num_scales(step, total_steps: int, s0: int = 10, s1: int = 1280):
  """iCT doubling curriculum N(k) = min(s0 2^floor(k/K'), s1) + 1, K' = floor(K / (log2 floor(s1/s0) + 1))."""
  k_prime = int(np.floor(total_steps / (np.log2(np.floor(s1 / s0)) + 1)))
  doublings = jnp.floor_divide(jnp.asarray(step, jnp.int32), max(k_prime, 1))
  n = jnp.minimum(s0 * 2.0 ** doublings.astype(jnp.float32), float(s1))
  return n.astype(jnp.int32) + 1


def ct_num_scales(step, total_steps: int, s0: int = 2, s1: int = 150):
  """CM-paper CT curriculum N(k) = ceil(sqrt(k/K ((s1+1)^2 - s0^2) + s0^2) - 1) + 1."""
  k = jnp.asarray(step, jnp.float32)
  n = jnp.ceil(jnp.sqrt(k / total_steps * ((s1 + 1) ** 2 - s0**2) + s0**2) - 1.0) + 1.0
  return n.astype(jnp.int32)


def ct_target_ema(num_scales, s0: int = 2, mu0: float = 0.9, convention: str = 'paper'):
  """CT target EMA mu(k) = exp(s0 ln(mu0) / N(k)) ('paper') or / (N(k) - 1) ('code', the official JAX code)."""
  n = jnp.asarray(num_scales, jnp.float32)
  if convention == 'paper':
    return jnp.exp(s0 * np.log(mu0) / n)
  if convention == 'code':
    return jnp.exp(s0 * np.log(mu0) / (n - 1.0))
  raise ValueError(f"Unknown CT mu convention {convention!r}; expected 'paper' or 'code'.")


def lognormal_index_logits(num_scales, max_scales: int, p_mean=-1.1, p_std=2.0,
                           sigma_min=0.002, sigma_max=80.0, rho=7.0):
  """iCT index distribution: log p(i) = log[erf((ln s_{i+1} - Pm)/(sqrt2 Ps)) - erf((ln s_i - Pm)/(sqrt2 Ps))].

  Returns logits over i = 0..max_scales-2 (a static length); entries with i >= N-1 are -inf.
  """
  i = jnp.arange(max_scales - 1)
  lo = karras_sigma(i, num_scales, sigma_min, sigma_max, rho)
  hi = karras_sigma(i + 1, num_scales, sigma_min, sigma_max, rho)
  cdf = lambda s: jax.scipy.special.erf((jnp.log(s) - p_mean) / (np.sqrt(2.0) * p_std))
  mass = cdf(hi) - cdf(lo)
  valid = i < num_scales - 1
  return jnp.where(valid, jnp.log(jnp.maximum(mass, 1e-30)), -jnp.inf)


def lct_adaptive_c(num_scales, s0: int, dim: int):
  """Improved latent CT's scale c(k): 0.00054 sqrt(D) in the first curriculum stage (N(k) - 1 <= s0), then
  exp(-1.15 ln(N(k) - 1) - 0.85) (0.0136 at N - 1 = 20, 0.00025 at 640)."""
  n = jnp.asarray(num_scales, jnp.float32) - 1.0
  return jnp.where(n <= s0, 0.00054 * np.sqrt(dim), jnp.exp(-1.15 * jnp.log(jnp.maximum(n, 1.0)) - 0.85))


def near_sigma_min(n, num_scales, fraction: float = 0.25):
  """Whether the pair (sigma_n, sigma_{n+1}) is among those closest to sigma_min: with the grid counted from sigma_max
  as in the reference code (i = N - 2 - n for the pair's upper level), i >= floor((1 - fraction) N)."""
  num_scales = jnp.asarray(num_scales, jnp.int32)
  from_max = num_scales - 2 - jnp.asarray(n, jnp.int32)
  return from_max >= jnp.floor((1.0 - fraction) * num_scales.astype(jnp.float32)).astype(jnp.int32)


def sample_lognormal_sigma(rng, shape, p_mean=-1.2, p_std=1.2):
  """ln sigma ~ N(P_mean, P_std^2): the EDM training noise distribution."""
  return jnp.exp(p_mean + p_std * jax.random.normal(rng, shape))


def ema_rate_from_halflife(halflife_images: float, batch_size: int) -> float:
  """Per-step EMA decay beta = 0.5^(batch / half-life in images)."""
  return float(0.5 ** (batch_size / halflife_images))


def ect_stage(step, stage_steps: int):
  """ECT stage = floor(k / stage_steps): the stage advances every `stage_steps` iterations."""
  return jnp.floor_divide(jnp.asarray(step, jnp.int32), stage_steps)


def ect_r(t, step, stage_steps: int, q: float):
  """ECT mapping r = max(t (1 - q^-(stage+1) (1 + 8 sigmoid(-t))), 0): r -> t as the stages advance."""
  shrink = q ** -(ect_stage(step, stage_steps).astype(jnp.float32) + 1.0) * (1.0 + 8.0 * jax.nn.sigmoid(-t))
  return jnp.maximum(t * (1.0 - shrink), 0.0)


# ----------------------------------------------------------------------------------------------------------
# Discrete VP timesteps (parameterization.VP): DDIM, the LCM skipping-step grid and LCM's multistep schedule.
# ----------------------------------------------------------------------------------------------------------
def ddim_timesteps(num_steps: int, num_timesteps: int = 1000) -> np.ndarray:
  """The 'trailing' DDIM grid t_i = round(T - i T / n) - 1, i = 0..n-1 (n = 50, T = 1000: 999, 979, ..., 19)."""
  if not 1 <= num_steps <= num_timesteps:
    raise ValueError(f'DDIM with {num_steps} steps needs 1 <= steps <= num_timesteps = {num_timesteps}.')
  return (np.round(num_timesteps - np.arange(num_steps) * num_timesteps / num_steps) - 1).astype(np.int32)


def skipping_grid(num_timesteps: int, skip: int) -> np.ndarray:
  """LCM's solver grid tau_i = k i - 1, i = 1..T/k (k = 20, T = 1000: 19, 39, ..., 999), increasing."""
  if skip < 1 or num_timesteps % skip:
    raise ValueError(f'objective.skip={skip} must be a positive divisor of num_timesteps={num_timesteps}.')
  return (skip * np.arange(1, num_timesteps // skip + 1) - 1).astype(np.int32)


def lcm_timesteps(num_steps: int, num_timesteps: int, skip: int) -> np.ndarray:
  """LCM multistep timesteps: the entries floor(linspace(0, M, n, endpoint=False)) of the decreasing solver grid
  [tau_M, ..., tau_1] (4 steps, T = 1000, k = 20: 999, 759, 499, 259)."""
  grid = skipping_grid(num_timesteps, skip)[::-1]
  if not 1 <= num_steps <= len(grid):
    raise ValueError(f'{num_steps}-step LCM sampling needs 1 <= steps <= {len(grid)} (the solver grid).')
  return grid[np.floor(np.linspace(0, len(grid), num_steps, endpoint=False)).astype(np.int64)]


def sample_skipping_pair(rng, batch: int, num_timesteps: int, skip: int):
  """(t_{n+k}, t_n) per sample: t_{n+k} = tau_i, i ~ U{1..T/k}, and t_n = max(tau_i - k, 0) (LCD, LCF)."""
  grid = jnp.asarray(skipping_grid(num_timesteps, skip))
  t = grid[jax.random.randint(rng, (batch,), 0, len(grid))]
  return t, jnp.maximum(t - skip, 0)
