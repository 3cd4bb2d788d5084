"""Noise processes and preconditioning: EDM/VE (with the eps-shifted boundary) and TrigFlow.

This module owns c_skip / c_out / c_in / c_noise; nothing else in cm_jax touches them.
A `net` argument is any callable `net(x_in, c_noise) -> F` (a network apply function with its
parameters, conditioning and dropout already bound), so the same preconditioning wraps every model.
Per-sample noise levels `sigma` / `t` have shape [B]; they broadcast against x of shape [B, ...].

Both processes offer what the samplers need, each in its own time t (EDM: t = sigma, as in EDM's sigma(t) = t;
TrigFlow: t = arctan(sigma / sd)): `t_max`, `t_from_sigma` and `x_from_sigma` (the change of variables from EDM's
(x_sigma, sigma)), `prior` (x at t_max from z ~ N(0, I)), `renoise` (x_t from a clean x), `consistency` and `denoise`.
"""

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp

from cm_jax import schedules

Net = Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]


def bcast(v, x):
  """Reshapes a per-sample vector [B] to broadcast against x [B, ...]."""
  return jnp.reshape(v, v.shape + (1,) * (x.ndim - v.ndim))


@dataclasses.dataclass(frozen=True)
class EDM:
  """Variance-exploding process x_sigma = x0 + sigma z with EDM preconditioning (Karras et al. 2022)."""
  sigma_data: float = 0.5
  sigma_min: float = 0.002
  sigma_max: float = 80.0

  @property
  def t_max(self):
    """t_max = sigma_max (EDM's time is its noise level)."""
    return self.sigma_max

  def t_from_sigma(self, sigma):
    """t = sigma."""
    return sigma

  def x_from_sigma(self, x_sigma, sigma):
    """x_t = x_sigma."""
    del sigma
    return x_sigma

  def prior(self, z):
    """x_T = T z for z ~ N(0, I) (the data's scale is negligible at T)."""
    return self.sigma_max * z

  def renoise(self, x, z, sigma):
    """x_sigma = x + sqrt(sigma^2 - eps^2) z for a clean x (at eps, the boundary) and z ~ N(0, I) (CM Algorithm 1)."""
    return x + bcast(jnp.sqrt(sigma**2 - self.sigma_min**2), x) * z

  def c_noise(self, sigma):
    """c_noise(sigma) = 0.25 ln(sigma)."""
    return 0.25 * jnp.log(sigma)

  def c_in(self, sigma):
    """c_in(sigma) = 1 / sqrt(sigma^2 + sigma_data^2)."""
    return 1.0 / jnp.sqrt(sigma**2 + self.sigma_data**2)

  def denoiser_scalings(self, sigma):
    """EDM denoiser: c_skip = sd^2 / (sigma^2 + sd^2), c_out = sigma sd / sqrt(sigma^2 + sd^2)."""
    sd2 = self.sigma_data**2
    return sd2 / (sigma**2 + sd2), sigma * self.sigma_data / jnp.sqrt(sigma**2 + sd2)

  def consistency_scalings(self, sigma):
    """CM boundary: c_skip = sd^2 / ((sigma - eps)^2 + sd^2), c_out = sd (sigma - eps) / sqrt(sd^2 + sigma^2)."""
    sd2, eps = self.sigma_data**2, self.sigma_min
    c_skip = sd2 / ((sigma - eps) ** 2 + sd2)
    c_out = self.sigma_data * (sigma - eps) / jnp.sqrt(sd2 + sigma**2)
    return c_skip, c_out

  def _precondition(self, net, x, sigma, scalings):
    c_skip, c_out = scalings
    out = net(bcast(self.c_in(sigma), x) * x, self.c_noise(sigma))
    return bcast(c_skip, x) * x + bcast(c_out, x) * out

  def denoise(self, net: Net, x, sigma):
    """D(x, sigma) = c_skip' x + c_out' F(c_in x, c_noise): the diffusion denoiser."""
    return self._precondition(net, x, sigma, self.denoiser_scalings(sigma))

  def consistency(self, net: Net, x, sigma):
    """f(x, sigma) = c_skip x + c_out F(c_in x, c_noise), with f(x, sigma_min) = x exactly."""
    return self._precondition(net, x, sigma, self.consistency_scalings(sigma))

  def diffusion_weight(self, sigma):
    """EDM loss weight lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2."""
    return (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2


@dataclasses.dataclass(frozen=True)
class TrigFlow:
  """x_t = cos(t) x0 + sin(t) z, z ~ N(0, sd^2 I), t in [0, pi/2] (Lu and Song 2024).

  sigma_min / sigma_max bound the equivalent EDM levels sigma = sd tan(t) (sigma_min: the teacher sampler's last level).
  """
  sigma_data: float = 0.5
  sigma_min: float = 0.002
  sigma_max: float = 80.0

  @property
  def t_max(self):
    """t_max = arctan(sigma_max / sd)."""
    return math.atan(self.sigma_max / self.sigma_data)

  def t_from_sigma(self, sigma):
    """t = arctan(sigma / sd): the change of variables from EDM noise levels."""
    return jnp.arctan(sigma / self.sigma_data)

  def x_from_sigma(self, x_sigma, sigma):
    """x_t = cos(t) x_sigma = sd x_sigma / sqrt(sigma^2 + sd^2): the change of variables from EDM's x_sigma."""
    return bcast(jnp.cos(self.t_from_sigma(sigma)), x_sigma) * x_sigma

  def prior(self, z):
    """x_{t_max} = sd z for z ~ N(0, I) (cos(t_max) x0 is negligible)."""
    return self.sigma_data * z

  def renoise(self, x, z, t):
    """x_t = cos(t) x + sin(t) sd z for a clean x and z ~ N(0, I) (sCM's multistep sampling)."""
    return self.noise(x, self.sigma_data * z, t)

  def sample_t(self, rng, shape, p_mean, p_std):
    """tau ~ N(P_mean, P_std^2), t = arctan(e^tau / sd): sCM's training-time distribution (EDM's lognormal sigma)."""
    return self.t_from_sigma(schedules.sample_lognormal_sigma(rng, shape, p_mean, p_std))

  def noise(self, x0, z, t):
    """x_t = cos(t) x0 + sin(t) z for z ~ N(0, sd^2 I)."""
    return bcast(jnp.cos(t), x0) * x0 + bcast(jnp.sin(t), x0) * z

  def velocity_from_denoiser(self, x, t, x0_hat):
    """dx_t/dt = (cos(t) x_t - E[x0 | x_t]) / sin(t): the PF-ODE velocity from any x0 estimate (t > 0)."""
    return (bcast(jnp.cos(t), x) * x - x0_hat) / bcast(jnp.sin(t), x)

  def edm_velocity(self, edm: EDM, net: Net, x, t):
    """dx_t/dt of an EDM denoiser via x_sigma = x_t / cos(t), sigma = sd tan(t)."""
    sigma = self.sigma_data * jnp.tan(t)
    return self.velocity_from_denoiser(x, t, edm.denoise(net, x / bcast(jnp.cos(t), x), sigma))

  def velocity(self, net: Net, x, t):
    """sd F(x / sd, t): the network's estimate of dx_t/dt = cos(t) z - sin(t) x0."""
    return self.sigma_data * net(x / self.sigma_data, t)

  def consistency(self, net: Net, x, t):
    """f(x_t, t) = cos(t) x_t - sin(t) sd F(x_t / sd, t); f(x, 0) = x."""
    return bcast(jnp.cos(t), x) * x - bcast(jnp.sin(t), x) * self.velocity(net, x, t)

  def denoise(self, net: Net, x, t):
    """x0 estimate of the diffusion model: identical to the consistency form for TrigFlow."""
    return self.consistency(net, x, t)


def make_parameterization(config):
  """Builds the noise process named by `config.parameterization.name` ('edm' or 'trigflow')."""
  p = config.parameterization
  if p.name == 'edm':
    return EDM(sigma_data=p.sigma_data, sigma_min=p.sigma_min, sigma_max=p.sigma_max)
  if p.name == 'trigflow':
    return TrigFlow(sigma_data=p.sigma_data, sigma_min=p.sigma_min, sigma_max=p.sigma_max)
  raise ValueError(f"Unknown parameterization.name {p.name!r}; expected 'edm' or 'trigflow'.")
