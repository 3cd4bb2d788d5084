"""ECT's loss as the official code computes it (locuslab/ect training/loss.py ECMLoss, networks.py ECMPrecond).

The loss is recomputed in numpy (float64) on the objective's own draws (its key split into t, z and dropout keys,
ln t = P_mean + P_std n), following the official formula written out here:
  t = exp(P_mean + P_std n)   (not clipped to [sigma_min, sigma_max])
  r = max(t (1 - q^-(stage+1) (1 + 8 sigmoid(-t))), 0)
  D(x, s) = sd^2 / (s^2 + sd^2) x + s sd / sqrt(s^2 + sd^2) F(x / sqrt(s^2 + sd^2), ln(s) / 4)   (EDM, no shift)
  target = D(x0 + r z, r) where r > 0, x0 where r = 0
  loss = mean_B w(t, r) ||D(x0 + t z, t) - target||_2,  w = 1 / (t - r) or (t^2 + sd^2) / (t sd)^2.
The cases are chosen so that each plausible one-line mistake moves the loss far outside the tolerance: clipping t
back to [sigma_min, sigma_max] (P_mean = -6 puts most t below 0.002), the sigma_min-shifted consistency scalings in
training (a 1% change at t ~ 0.3), and the data target wherever r <= sigma_min (stage 3 at P_mean = -6).
"""

import importlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from cm_jax.objectives.ect import make_ect
from cm_jax.parameterization import EDM

SD = 0.5
PROCESS = EDM(sigma_data=SD, sigma_min=0.002, sigma_max=80.0)
W, V = 0.7, 0.3


class Probe(nn.Module):
  """F(x_in, c_noise) = tanh(w x_in + v c_noise): a network whose output depends on both inputs, in closed form."""

  @nn.compact
  def __call__(self, x_in, c_noise, cond=None, train=False):
    w = self.param('w', nn.initializers.constant(W), ())
    v = self.param('v', nn.initializers.constant(V), ())
    return jnp.tanh(w * x_in + v * c_noise.reshape(c_noise.shape + (1,) * (x_in.ndim - 1)))


def _config(p_mean, p_std, weighting='inverse_delta', q=2.0):
  return ml_collections.ConfigDict(dict(
      objective=dict(name='ect', p_mean=p_mean, p_std=p_std, q=q, stage_steps=100, distance='l2_norm',
                     weighting=weighting),
      model=dict(num_classes=0)))


def _denoise_np(x, s):
  s = s[:, None]
  f = np.tanh(W * x / np.sqrt(s**2 + SD**2) + V * np.log(s) / 4.0)
  return SD**2 / (s**2 + SD**2) * x + s * SD / np.sqrt(s**2 + SD**2) * f


def _official_loss(x0, rng, stage, p_mean, p_std, weighting='inverse_delta', q=2.0):
  """The official ECMLoss on the objective's draws (float64)."""
  rng_t, rng_z, _ = jax.random.split(rng, 3)
  n = np.asarray(jax.random.normal(rng_t, (x0.shape[0],)), np.float64)
  z = np.asarray(jax.random.normal(rng_z, x0.shape), np.float64)
  t = np.exp(p_mean + p_std * n)
  r = np.maximum(t * (1.0 - q ** -(stage + 1.0) * (1.0 + 8.0 / (1.0 + np.exp(t)))), 0.0)
  pred = _denoise_np(x0 + t[:, None] * z, t)
  safe_r = np.where(r > 0, r, 1.0)
  target = np.where((r > 0)[:, None], _denoise_np(x0 + safe_r[:, None] * z, safe_r), x0)
  w = 1.0 / (t - r) if weighting == 'inverse_delta' else (t**2 + SD**2) / (t * SD) ** 2
  return float(np.mean(w * np.sqrt(np.sum((pred - target) ** 2, axis=-1)))), t, r


def _objective_loss(config, x0, rng, step):
  model = Probe()
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, x0.shape[1])), jnp.zeros((1,)))['params']
  objective = make_ect(config, model, PROCESS)
  return float(objective.loss(params, {}, {}, {'image': jnp.asarray(x0, jnp.float32)}, rng, step)[0])


CASES = [  # (P_mean, P_std, stage, weighting): what each case checks is in the module docstring
    (-1.1, 2.0, 0, 'inverse_delta'),   # CIFAR-10's distribution at stage 0: r = 0 below t = ln 7
    (-1.1, 2.0, 3, 'inverse_delta'),
    (-6.0, 1.5, 0, 'inverse_delta'),   # most t below sigma_min = 0.002
    (-6.0, 1.5, 3, 'inverse_delta'),   # 0 < r <= sigma_min for many samples
    (-0.8, 1.6, 2, 'edm'),             # ImageNet-64's distribution and weighting
]


@pytest.mark.parametrize('p_mean, p_std, stage, weighting', CASES)
def test_ect_loss_is_the_official_formula(p_mean, p_std, stage, weighting):
  x0 = np.asarray(jax.random.uniform(jax.random.PRNGKey(7), (256, 12), minval=-1.0, maxval=1.0), np.float64)
  rng = jax.random.PRNGKey(11)
  expected, t, r = _official_loss(x0, rng, stage, p_mean, p_std, weighting)
  got = _objective_loss(_config(p_mean, p_std, weighting), x0, rng, step=100 * stage + 50)
  np.testing.assert_allclose(got, expected, rtol=2e-4)
  if p_mean == -6.0:  # the case exercises what it is meant to
    assert np.mean(t < PROCESS.sigma_min) > 0.3
    if stage == 3:
      assert np.mean((r > 0) & (r <= PROCESS.sigma_min)) > 0.3


def test_ect_loss_and_gradient_are_finite_where_r_is_zero():
  """r = 0 (every sample at stage 0 with small t): no ln 0 reaches the loss or the gradient."""
  x0 = jnp.zeros((8, 12))
  model = Probe()
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 12)), jnp.zeros((1,)))['params']
  objective = make_ect(_config(-3.0, 0.5), model, PROCESS)
  loss, grad = jax.value_and_grad(lambda p: objective.loss(p, {}, {}, {'image': x0}, jax.random.PRNGKey(1), 0)[0])(
      params)
  assert np.isfinite(float(loss)) and all(np.isfinite(float(g)) for g in jax.tree_util.tree_leaves(grad))


@pytest.mark.parametrize('name', ['digits_ect', 'cifar10_ect'])
def test_ect_configs_sample_with_the_official_sigma_min(name):
  """ECMPrecond's sigma_min = 0.003 is the boundary of the sampling-time scalings (training does not read it)."""
  config = importlib.import_module(f'configs.{name}').get_config()
  assert config.parameterization.sigma_min == pytest.approx(0.003)
