"""Noise processes and preconditioning: EDM/VE (with the eps-shifted boundary), TrigFlow and discrete VP (DDPM).

This module owns c_skip / c_out / c_in / c_noise; nothing else in cm_jax touches them.
A `net` argument is any callable `net(x_in, c_noise) -> F` (a network apply function with its
parameters, conditioning and dropout already bound), so the same preconditioning wraps every model.
Per-sample noise levels `sigma` / `t` have shape [B]; they broadcast against x of shape [B, ...].

Both processes offer what the samplers need, each in its own time t (EDM: t = sigma, as in EDM's sigma(t) = t;
TrigFlow: t = arctan(sigma / sd)): `t_max`, `t_from_sigma` and `x_from_sigma` (the change of variables from EDM's
(x_sigma, sigma)), `prior` (x at t_max from z ~ N(0, I)), `renoise` (x_t from a clean x), `consistency` and `denoise`.
VP, the process of latent diffusion, has integer timesteps t = 0..T-1 and its own samplers (DDIM, LCM; sampling.py).
FlowMatching (z_t = (1 - t) x + t e, t in [0, 1]) is the process of flow matching and MeanFlow; it has its own ODE
samplers (sampling.FLOW_ODE, sampling.MEANFLOW).
"""

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

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


BETA_SCHEDULES = ('scaled_linear', 'linear')
PREDICTIONS = ('epsilon', 'v', 'sample')


@dataclasses.dataclass(frozen=True)
class VP:
  """Discrete variance-preserving process of DDPM and latent diffusion: x_t = alpha_t x0 + sigma_t eps, eps ~ N(0, I),
  alpha_t = sqrt(prod_{s<=t} (1 - beta_s)), sigma_t = sqrt(1 - alpha_t^2), t = 0..T-1 (T = num_timesteps).

  betas: 'scaled_linear' (sqrt(beta) linear from sqrt(beta_start) to sqrt(beta_end), Stable Diffusion) or 'linear'.
  prediction: what the network F(x_t, t) predicts: 'epsilon', 'v' (= alpha eps - sigma x0) or 'sample' (x0).
  The network's noise input c_noise is the timestep t itself (as a float). t = -1 stands for the clean end of the
  process (alpha = 1, sigma = 0), where DDIM's last step lands.
  sigma_data and timestep_scaling set LCM's boundary scalings (`consistency_scalings`).
  """
  num_timesteps: int = 1000
  beta_start: float = 0.00085
  beta_end: float = 0.012
  beta_schedule: str = 'scaled_linear'
  prediction: str = 'epsilon'
  sigma_data: float = 0.5
  timestep_scaling: float = 10.0

  def __post_init__(self):
    if self.beta_schedule not in BETA_SCHEDULES:
      raise ValueError(f'parameterization.beta_schedule={self.beta_schedule!r}; expected one of {BETA_SCHEDULES}.')
    if self.prediction not in PREDICTIONS:
      raise ValueError(f'parameterization.prediction={self.prediction!r}; expected one of {PREDICTIONS}.')
    if not 0 < self.beta_start < self.beta_end < 1 or self.num_timesteps < 2:
      raise ValueError(f'parameterization: need 0 < beta_start < beta_end < 1 and num_timesteps >= 2; got '
                       f'{self.beta_start}, {self.beta_end}, {self.num_timesteps}.')

  def alphas_cumprod(self) -> np.ndarray:
    """alpha_t^2 = prod_{s<=t} (1 - beta_s) for t = 0..T-1 (float64)."""
    if self.beta_schedule == 'scaled_linear':
      betas = np.linspace(self.beta_start**0.5, self.beta_end**0.5, self.num_timesteps, dtype=np.float64) ** 2
    else:
      betas = np.linspace(self.beta_start, self.beta_end, self.num_timesteps, dtype=np.float64)
    return np.cumprod(1.0 - betas)

  def alpha_sigma(self, t):
    """(alpha_t, sigma_t) for integer t [B] in -1..T-1 (t = -1: (1, 0))."""
    table = jnp.asarray(np.concatenate([[1.0], self.alphas_cumprod()]), jnp.float32)
    abar = table[jnp.asarray(t, jnp.int32) + 1]
    return jnp.sqrt(abar), jnp.sqrt(1.0 - abar)

  def noise(self, x0, eps, t):
    """x_t = alpha_t x0 + sigma_t eps."""
    alpha, sigma = self.alpha_sigma(t)
    return bcast(alpha, x0) * x0 + bcast(sigma, x0) * eps

  def target(self, x0, eps, t):
    """What the network learns to predict at x_t: eps, v = alpha_t eps - sigma_t x0, or x0."""
    if self.prediction == 'epsilon':
      return eps
    if self.prediction == 'sample':
      return x0
    alpha, sigma = self.alpha_sigma(t)
    return bcast(alpha, x0) * eps - bcast(sigma, x0) * x0

  def predict(self, net: Net, x, t):
    """(x0_hat, eps_hat) from F(x_t, t): eps: x0 = (x - sigma F) / alpha; v: x0 = alpha x - sigma F,
    eps = sigma x + alpha F; sample: eps = (x - alpha F) / sigma."""
    out = net(x, jnp.asarray(t, jnp.float32))
    alpha, sigma = (bcast(a, x) for a in self.alpha_sigma(t))
    if self.prediction == 'epsilon':
      return (x - sigma * out) / alpha, out
    if self.prediction == 'v':
      return alpha * x - sigma * out, sigma * x + alpha * out
    return out, (x - alpha * out) / sigma

  def ddim_step(self, x0_hat, eps_hat, t_prev):
    """DDIM (eta = 0): x_{t_prev} = alpha_{t_prev} x0_hat + sigma_{t_prev} eps_hat (t_prev = -1: x0_hat)."""
    return self.noise(x0_hat, eps_hat, t_prev)

  def consistency_scalings(self, t):
    """LCM's boundary scalings of the integer timestep: with u = timestep_scaling t,
    c_skip = sd^2 / (u^2 + sd^2), c_out = u / sqrt(u^2 + sd^2); c_skip(0) = 1, c_out(0) = 0."""
    u = self.timestep_scaling * jnp.asarray(t, jnp.float32)
    sd2 = self.sigma_data**2
    return sd2 / (u**2 + sd2), u / jnp.sqrt(u**2 + sd2)

  def consistency(self, net: Net, x, t):
    """f(x_t, t) = c_skip(t) x_t + c_out(t) x0_hat(x_t, t) (LCM); f(x, 0) = x."""
    c_skip, c_out = self.consistency_scalings(t)
    return bcast(c_skip, x) * x + bcast(c_out, x) * self.predict(net, x, t)[0]

  def denoise(self, net: Net, x, t):
    """x0_hat(x_t, t): the diffusion model's estimate of the clean sample."""
    return self.predict(net, x, t)[0]


@dataclasses.dataclass(frozen=True)
class FlowMatching:
  """The linear interpolation z_t = (1 - t) x + t e, e ~ N(0, I), t in [0, 1] (rectified flow, SiT, MeanFlow):
  t = 0 is data, t = 1 noise, and the conditional velocity is v = dz_t/dt = e - x.

  The network sees z_t itself and c_noise(t) = t; it predicts a velocity (flow matching: v(z_t, t); MeanFlow: the
  average velocity u(z_t, r, t) with the second time embedded by the network, model.second_time). Its ODE runs
  from t = 1 (z_1 = e, `prior`) to t = 0: dz/dt = v, so z_0 = z_1 - int_0^1 v dt.
  """
  t_max: float = 1.0

  def c_noise(self, t):
    """c_noise(t) = t."""
    return t

  def prior(self, e):
    """z_1 = e for e ~ N(0, I)."""
    return e

  def noise(self, x, e, t):
    """z_t = (1 - t) x + t e."""
    return bcast(1.0 - t, x) * x + bcast(t, x) * e

  def target_velocity(self, x, e):
    """v = dz_t/dt = e - x (the conditional velocity; its mean given z_t is the marginal velocity)."""
    return e - x

  def sample_t(self, rng, shape, p_mean, p_std):
    """Logit-normal t = sigmoid(n), n ~ N(P_mean, P_std^2) (SD3, SiT, MeanFlow)."""
    return jax.nn.sigmoid(p_mean + p_std * jax.random.normal(rng, shape))

  def velocity(self, net: Net, z, t):
    """v(z_t, t) = F(z_t, c_noise(t))."""
    return net(z, self.c_noise(t))

  def denoise(self, net: Net, z, t):
    """x0 estimate z_t - t v(z_t, t) (E[x | z_t] for the exact marginal velocity)."""
    return z - bcast(t, z) * self.velocity(net, z, t)


def make_parameterization(config):
  """Builds the noise process named by `config.parameterization.name` ('edm', 'trigflow', 'vp' or 'flow_matching')."""
  p = config.parameterization
  if p.name == 'edm':
    return EDM(sigma_data=p.sigma_data, sigma_min=p.sigma_min, sigma_max=p.sigma_max)
  if p.name == 'trigflow':
    return TrigFlow(sigma_data=p.sigma_data, sigma_min=p.sigma_min, sigma_max=p.sigma_max)
  if p.name == 'vp':
    return VP(num_timesteps=p.num_timesteps, beta_start=p.beta_start, beta_end=p.beta_end,
              beta_schedule=p.beta_schedule, prediction=p.prediction, sigma_data=p.sigma_data,
              timestep_scaling=p.timestep_scaling)
  if p.name == 'flow_matching':
    return FlowMatching()
  raise ValueError(f"Unknown parameterization.name {p.name!r}; expected 'edm', 'trigflow', 'vp' or 'flow_matching'.")
