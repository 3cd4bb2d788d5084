"""Gaussian oracles (reference section 1): with Gaussian data everything is known in closed form.

EDM / VE, data x0 ~ N(0, a^2 I), x = x0 + sigma z:
  D*(x, sigma) = a^2 / (sigma^2 + a^2) x,     x(s) = x(sigma) sqrt(s^2 + a^2) / sqrt(sigma^2 + a^2),
  f*(x, sigma) = x sqrt(eps^2 + a^2) / sqrt(sigma^2 + a^2)   (a = sd unless stated).
TrigFlow, data x0 ~ N(0, a^2 I), z ~ N(0, sd^2 I), x_t = cos(t) x0 + sin(t) z, v(t) = a^2 cos^2 t + sd^2 sin^2 t:
  E[dx_t/dt | x_t] = cos(t) sin(t) (sd^2 - a^2) / v(t) x_t,   f*(x, t) = x a / sqrt(v(t)).

The networks here invert the papers' preconditioning with scalings written in this file from the papers' formulas, so
that a wrong scaling in cm_jax/parameterization.py makes the oracle wrong instead of cancelling out.
"""

import flax.linen as nn
import jax.numpy as jnp

from cm_jax.parameterization import EDM

SD, EPS, T = 0.5, 0.002, 80.0
EDM_ = EDM(sigma_data=SD, sigma_min=EPS, sigma_max=T)


def cm_scalings(sigma):
  """CM paper: c_skip = sd^2 / ((sigma - eps)^2 + sd^2), c_out = sd (sigma - eps) / sqrt(sd^2 + sigma^2)."""
  return SD**2 / ((sigma - EPS) ** 2 + SD**2), SD * (sigma - EPS) / (SD**2 + sigma**2) ** 0.5


def edm_denoiser_scalings(sigma):
  """EDM: c_skip = sd^2 / (sigma^2 + sd^2), c_out = sigma sd / sqrt(sigma^2 + sd^2)."""
  return SD**2 / (sigma**2 + SD**2), sigma * SD / (sigma**2 + SD**2) ** 0.5


def exact_denoiser(x, sigma):
  return SD**2 / (sigma[:, None] ** 2 + SD**2) * x


def exact_consistency(x, sigma):
  return x * (EPS**2 + SD**2) ** 0.5 / (sigma[:, None] ** 2 + SD**2) ** 0.5


def _undo_edm_inputs(x_in, c_noise):
  """(x, sigma [B, 1]) from EDM's network inputs c_in x = x / sqrt(sigma^2 + sd^2) and c_noise = ln(sigma) / 4."""
  sigma = jnp.exp(4.0 * c_noise)[:, None]
  return x_in * (sigma**2 + SD**2) ** 0.5, sigma


def _solve_for_output(target, x, c_skip, c_out):
  """F with c_skip x + c_out F = target (0 where c_out = 0: the boundary, where f = x for any F)."""
  safe = jnp.abs(c_out) > 1e-6
  return jnp.where(safe, (target - c_skip * x) / jnp.where(safe, c_out, 1.0), 0.0)


class OracleNet(nn.Module):
  """F with the CM paper's consistency preconditioning giving f* + a x when gate = 1 (the initial value).

  gate = 0 gives F = 0, which under EDM's denoiser preconditioning is exactly D* (c_skip' x = D*): the same
  network with parameters {'a': 0, 'gate': 0} is the exact diffusion teacher.
  """

  @nn.compact
  def __call__(self, x_in, c_noise, cond=None, train=False):
    a = self.param('a', nn.initializers.zeros, ())
    gate = self.param('gate', nn.initializers.ones, ())
    x, sigma = _undo_edm_inputs(x_in, c_noise)
    c_skip, c_out = cm_scalings(sigma)
    return gate * _solve_for_output(exact_consistency(x, sigma[:, 0]) + a * x, x, c_skip, c_out)


class DenoiserOracle(nn.Module):
  """F with EDM's denoiser preconditioning giving D*(x, sigma) = a^2 / (sigma^2 + a^2) x, data x0 ~ N(0, a^2 I)."""
  data_std: float

  @nn.compact
  def __call__(self, x_in, c_noise, cond=None, train=False):
    x, sigma = _undo_edm_inputs(x_in, c_noise)
    c_skip, c_out = edm_denoiser_scalings(sigma)
    return _solve_for_output(self.data_std**2 / (sigma**2 + self.data_std**2) * x, x, c_skip, c_out)


def trigflow_variance(t, a):
  """v(t) = a^2 cos^2 t + sd^2 sin^2 t: the variance of x_t per dimension."""
  return a**2 * jnp.cos(t) ** 2 + SD**2 * jnp.sin(t) ** 2


class TrigFlowOracle(nn.Module):
  """teacher = 1: the exact teacher F = (dx_t/dt) / sd; teacher = 0: F with f = f* + alpha sin(t) x (alpha trainable).

  TrigFlow's network sees x_t / sd and t. The perturbation vanishes at t = 0 (f keeps its boundary condition,
  F = F* - alpha x / sd stays finite) and changes along the trajectories, so it is visible to the tangent (a
  time-independent alpha x would not be for a = sd).
  """
  a: float

  @nn.compact
  def __call__(self, x_in, t, cond=None, train=False):
    alpha = self.param('alpha', nn.initializers.zeros, ())
    teacher = self.param('teacher', nn.initializers.zeros, ())
    x, t = SD * x_in, t[:, None]
    velocity = jnp.cos(t) * jnp.sin(t) * (SD**2 - self.a**2) / trigflow_variance(t, self.a) * x
    f = x * self.a / jnp.sqrt(trigflow_variance(t, self.a)) + alpha * jnp.sin(t) * x
    return teacher * velocity / SD + (1.0 - teacher) * (jnp.cos(t) * x - f) / (jnp.sin(t) * SD)
