"""Tests that catch a wrong scale: every value here is chosen so that no factor of the formula equals 1.

A default that makes a factor 1 (LoRA's alpha = r, DDIM's alpha_bar at the last timestep ~ 1, a guidance scale of 1,
sigma_data = 0.5 with the usual timestep_scaling) hides a one-line mistake from every test that uses it. Each test
below recomputes the expected output by hand in numpy (float64) with factors away from 1:

  LoRA          rank r = 2, alpha = 6: the adapted dense layer is x W + b + (alpha / r) (x A) B (not alpha (x A) B).
  DDIM          the last step lands on the clean end (alpha_bar_prev = 1, timestep -1: diffusers' DDIMScheduler with
                set_alpha_to_one=True), not on timestep 0; with and without classifier-free guidance s = 3.
  LCM scalings  VP(sigma_data=0.8, timestep_scaling=3): c_skip = sd^2 / (u^2 + sd^2), c_out = u / sqrt(u^2 + sd^2).
  LCM sampler   skip 250 (not 20), sigma_data 0.8, timestep_scaling 0.005 (at the default 10, c_skip ~ 1e-7 at the
                sampler's timesteps hides both), epsilon and v prediction: the multistep loop by hand.
  embeddings    the positional embedding's multiplier s = 7 (default 1) and the Fourier frequencies' std 3.
"""

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from cm_jax import sampling
from cm_jax.models import build_model
from cm_jax.models import lora
from cm_jax.objectives import make_objective
from cm_jax.objectives.latent import make_lcd
from cm_jax.parameterization import VP

RANK, ALPHA = 2, 6.0  # alpha / r = 3: neither 1 nor alpha


# ----------------------------------------------------------------------------------------------------------
# LoRA: the scale alpha / r, through the objective that computes it (objectives/lora.py).
# ----------------------------------------------------------------------------------------------------------
class OneDense(nn.Module):
  features: int

  @nn.compact
  def __call__(self, x):
    return nn.Dense(self.features, name='dense')(x)


def _lora_config():
  return ml_collections.ConfigDict(dict(
      model=dict(num_classes=3, label_dropout=0.1), teacher=dict(init=False),
      parameterization=dict(name='vp', num_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                            beta_schedule='scaled_linear', prediction='epsilon', sigma_data=0.5, timestep_scaling=10.0),
      objective=dict(name='lcd', skip=20, guidance_scale=(2.0, 2.0), target_ema=0.0, distance='l2', distance_c=0.0),
      lora=dict(rank=RANK, alpha=ALPHA, rules=('kernel$',))))


def _lora_setup():
  config = _lora_config()
  mlp = build_model(dict(name='mlp', hidden=8, depth=1, num_classes=3, label_dropout=0.1,
                         time_embedding='positional', time_scale=1.0))
  sample_input = (jnp.zeros((1, 4)), jnp.zeros((1,)), jnp.zeros((1,), jnp.int32))
  teacher = jax.tree.map(lambda p: p + 0.1, mlp.init(jax.random.PRNGKey(0), *sample_input)['params'])
  objective = make_objective(config, mlp)
  adapters = objective.init_params(mlp, jax.random.PRNGKey(1), sample_input)
  # both factors random: B = 0 at init would hide any scale
  leaves, treedef = jax.tree.flatten(adapters)
  keys = jax.random.split(jax.random.PRNGKey(7), len(leaves))
  adapters = treedef.unflatten([a + 0.3 * jax.random.normal(k, a.shape) for a, k in zip(leaves, keys)])
  return config, mlp, teacher, objective, adapters


def _numpy_merged(teacher, adapters):
  """W + (alpha / r) A B for every adapted kernel, in float64."""
  flat = {k: np.asarray(v, np.float64) for k, v in flax.traverse_util.flatten_dict(teacher, sep='/').items()}
  for path, ad in flax.traverse_util.flatten_dict(adapters, sep='/', is_leaf=lambda p, v: set(v) == {'a', 'b'}
                                                  if isinstance(v, dict) else False).items():
    a, b = np.asarray(ad['a'], np.float64), np.asarray(ad['b'], np.float64)
    flat[path] = flat[path] + (ALPHA / RANK) * np.einsum('...r,ro->...o', a, b)
  return flat


def test_lora_scale_is_alpha_over_rank_in_the_merged_and_unmerged_forms():
  """rank 2, alpha 6: sampling's merged kernels are W + 3 A B (numpy), the training loss (the un-merged form) equals
  the full-network loss at those kernels, and one adapted dense layer computes x W + b + 3 (x A) B by hand."""
  config, mlp, teacher, objective, adapters = _lora_setup()
  expected = _numpy_merged(teacher, adapters)
  merged = flax.traverse_util.flatten_dict(objective.sample_params(adapters, {'teacher': teacher}), sep='/')
  assert any(p.endswith('kernel') for p in merged) and set(merged) == set(expected)
  for path, value in merged.items():
    np.testing.assert_allclose(np.asarray(value), expected[path], rtol=1e-5, atol=1e-6, err_msg=path)

  batch = {'image': jax.random.normal(jax.random.PRNGKey(2), (8, 4)), 'label': jnp.arange(8) % 3}
  inputs = {'teacher': teacher, 'target': None}
  with_lora, _ = objective.loss(adapters, {}, inputs, batch, jax.random.PRNGKey(4), 0)
  merged_params = flax.traverse_util.unflatten_dict(
      {k: jnp.asarray(v, jnp.float32) for k, v in expected.items()}, sep='/')
  plain, _ = make_lcd(config, mlp, VP()).loss(merged_params, {}, inputs, batch, jax.random.PRNGKey(4), 0)
  np.testing.assert_allclose(float(with_lora), float(plain), rtol=1e-4)

  # one adapted dense layer, un-merged, against x W + b + (alpha / r) (x A) B
  path = sorted(p for p in expected if p.endswith('kernel'))[0]
  module_path = path.split('/')[:-1]
  ad = flax.traverse_util.flatten_dict(adapters, sep='/', is_leaf=lambda p, v: isinstance(v, dict) and
                                       set(v) == {'a', 'b'})[path]
  w = np.asarray(flax.traverse_util.flatten_dict(teacher, sep='/')[path], np.float64)
  bias = np.asarray(flax.traverse_util.flatten_dict(teacher, sep='/')['/'.join(module_path + ['bias'])], np.float64)
  x = np.random.default_rng(0).standard_normal((3, w.shape[0]))
  dense = OneDense(w.shape[1])
  base = {'dense': {'kernel': jnp.asarray(w, jnp.float32), 'bias': jnp.asarray(bias, jnp.float32)}}
  got = lora.apply_unmerged(dense, lora.LoRAParams(base, {'dense': {'kernel': ad}}, ALPHA / RANK),
                            jnp.asarray(x, jnp.float32))
  a, b = np.asarray(ad['a'], np.float64), np.asarray(ad['b'], np.float64)
  np.testing.assert_allclose(np.asarray(got), x @ w + bias + (ALPHA / RANK) * (x @ a) @ b, rtol=1e-5, atol=1e-5)
  assert not np.allclose(np.asarray(got), x @ w + bias + ALPHA * (x @ a) @ b, rtol=1e-3)  # the wrong scale differs


# ----------------------------------------------------------------------------------------------------------
# DDIM: the last step lands on the clean end (alpha_bar_prev = 1), with and without guidance.
# ----------------------------------------------------------------------------------------------------------
class CondEps(nn.Module):
  """eps(x, t, c) = (0.4 + t / 2000 + 0.3 c) x + 0.2 sin(x) (label -1: c = 0, the unconditional branch)."""
  num_classes: int = 3
  label_dropout: float = 0.1

  @nn.compact
  def __call__(self, x, c_noise, cond=None, train=False):
    self.param('unused', nn.initializers.zeros, ())
    c = jnp.zeros(x.shape[:1]) if cond is None else jnp.where(cond >= 0, cond, 0).astype(jnp.float32)
    coef = 0.4 + c_noise / 2000.0 + 0.3 * c
    return coef[:, None] * x + 0.2 * jnp.sin(x)


def _np_eps(x, t, c):
  return (0.4 + t / 2000.0 + 0.3 * c)[:, None] * x + 0.2 * np.sin(x)


def _numpy_ddim(x, ts, labels, scale, final=1.0):
  """diffusers' DDIMScheduler (eta = 0, set_alpha_to_one=True): the step after the last timestep uses
  alpha_bar_prev = final_alpha_cumprod = 1 (`final`), so the sample is the last x0_hat."""
  abar = VP().alphas_cumprod()
  labels = np.asarray(labels, np.float64)
  for i, t in enumerate(ts):
    eps = _np_eps(x, np.full(len(x), t, np.float64), labels)
    if scale is not None:
      uncond = _np_eps(x, np.full(len(x), t, np.float64), np.zeros(len(x)))
      eps = uncond + scale * (eps - uncond)
    x0 = (x - np.sqrt(1.0 - abar[t]) * eps) / np.sqrt(abar[t])
    abar_prev = abar[ts[i + 1]] if i + 1 < len(ts) else final
    x = np.sqrt(abar_prev) * x0 + np.sqrt(1.0 - abar_prev) * eps
  return x


@pytest.mark.parametrize('scale', [None, 3.0])
def test_ddim_last_step_lands_on_the_clean_end(scale):
  config = ml_collections.ConfigDict(dict(parameterization=dict(name='vp'), model=dict(num_classes=3),
                                          sampling=dict(guidance_scale=1.0 if scale is None else scale)))
  shape, rng = (6, 5), jax.random.PRNGKey(3)
  labels = jnp.array([0, 1, 2, 0, 1, 2])
  sample = sampling.DDIM.build(config, CondEps(), VP())
  out = np.asarray(sample({'unused': 0.0}, rng, labels, shape, 4), np.float64)
  x_T = np.asarray(jax.random.normal(jax.random.split(rng)[0], shape), np.float64)  # the sampler's own x_999
  ts = [999, 749, 499, 249]
  expected = _numpy_ddim(x_T, ts, labels, scale)
  np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)
  # a last step to timestep 0 instead (alpha_bar_0 = 0.99915) is visibly another sample
  abar = VP().alphas_cumprod()
  assert np.max(np.abs(expected - _numpy_ddim(x_T, ts, labels, scale, final=abar[0]))) > 1e-2



# ----------------------------------------------------------------------------------------------------------
# LCM's boundary scalings with sigma_data and timestep_scaling away from their defaults.
# ----------------------------------------------------------------------------------------------------------
def test_lcm_boundary_scalings_follow_sigma_data_and_timestep_scaling():
  vp = VP(sigma_data=0.8, timestep_scaling=3.0)
  t = np.array([0, 1, 19, 250, 999], np.float64)
  u = 3.0 * t
  c_skip, c_out = vp.consistency_scalings(jnp.asarray(t, jnp.int32))
  np.testing.assert_allclose(c_skip, 0.64 / (u**2 + 0.64), rtol=1e-5, atol=1e-9)
  np.testing.assert_allclose(c_out, u / np.sqrt(u**2 + 0.64), rtol=1e-5)
  # and the consistency function uses them: f = c_skip x + c_out x0_hat
  x = np.linspace(-1.0, 1.0, 10).reshape(5, 2)
  net = lambda y, c: 0.5 * y
  f = np.asarray(vp.consistency(net, jnp.asarray(x, jnp.float32), jnp.asarray(t, jnp.int32)))
  alpha, sigma = (np.asarray(a, np.float64) for a in vp.alpha_sigma(jnp.asarray(t, jnp.int32)))
  x0 = (x - sigma[:, None] * 0.5 * x) / alpha[:, None]
  cs, co = 0.64 / (u**2 + 0.64), u / np.sqrt(u**2 + 0.64)
  np.testing.assert_allclose(f, cs[:, None] * x + co[:, None] * x0, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# LCM's multistep sampler with sigma_data, timestep_scaling and skip away from their defaults.
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('prediction', ['epsilon', 'v'])
def test_lcm_multistep_sampler_by_hand(prediction):
  """T = 1000, skip k = 250: the solver grid 249, 499, 749, 999; 3 steps take floor(linspace(0, 4, 3)) = 0, 1, 2 of
  it reversed: 999, 749, 499. Each step is x0 <- c_skip z + c_out x0_hat(z) with u = 0.005 t, sd = 0.8 (c_skip
  0.025 .. 0.09: at LCM's default timestep_scaling = 10 it is ~1e-7 at these t and would hide both), and between
  steps z <- alpha_t x0 + sigma_t z' (numpy, float64)."""
  vp = VP(sigma_data=0.8, timestep_scaling=0.005, prediction=prediction)
  config = ml_collections.ConfigDict(dict(objective=dict(skip=250), sampling=dict(guidance_scale=1.0)))
  shape, rng = (6, 5), jax.random.PRNGKey(5)
  labels = jnp.array([0, 1, 2, 0, 1, 2])
  out = np.asarray(sampling.LCM.build(config, CondEps(), vp)({'unused': 0.0}, rng, labels, shape, 3), np.float64)
  rng_z, rng_noise = jax.random.split(rng)  # the sampler's own draws
  z = np.asarray(jax.random.normal(rng_z, shape), np.float64)
  noises = [np.asarray(jax.random.normal(jax.random.fold_in(rng_noise, k), shape), np.float64) for k in range(2)]
  abar = VP().alphas_cumprod()
  c = np.asarray(labels, np.float64)
  x, x0 = z, None
  for i, t in enumerate([999, 749, 499]):
    if x0 is not None:
      x = np.sqrt(abar[t]) * x0 + np.sqrt(1.0 - abar[t]) * noises[i - 1]
    alpha, sigma = np.sqrt(abar[t]), np.sqrt(1.0 - abar[t])
    out_t = _np_eps(x, np.full(6, float(t)), c)
    x0_hat = (x - sigma * out_t) / alpha if prediction == 'epsilon' else alpha * x - sigma * out_t
    u = 0.005 * t
    x0 = 0.64 / (u**2 + 0.64) * x + u / np.sqrt(u**2 + 0.64) * x0_hat
  np.testing.assert_allclose(out, x0, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------------------------------------
# The networks' noise embeddings with their scales away from 1.
# ----------------------------------------------------------------------------------------------------------
def test_noise_embeddings_scale_their_input():
  """Positional: [cos(w_i s c), sin(w_i s c)], w_i = (1/10000)^(i/half), s = 7; Fourier: [cos(2 pi f c),
  sin(2 pi f c)] with f = 3 N(0, 1) from the fixed numpy seed (scale 3, not EDM's 16)."""
  from cm_jax.models import layers  # pylint: disable=g-import-not-at-top
  c = np.array([-0.7, 0.05, 1.3])
  got = np.asarray(layers.PositionalEmbedding(8, scale=7.0).apply({}, jnp.asarray(c, jnp.float32)))
  angles = np.outer(7.0 * c, (1.0 / 10000.0) ** (np.arange(4) / 4))
  np.testing.assert_allclose(got, np.concatenate([np.cos(angles), np.sin(angles)], -1), rtol=1e-5, atol=1e-5)
  got = np.asarray(layers.FourierEmbedding(8, scale=3.0, seed=4).apply({}, jnp.asarray(c, jnp.float32)))
  angles = np.outer(c, 2 * np.pi * 3.0 * np.random.default_rng(4).standard_normal(4))
  np.testing.assert_allclose(got, np.concatenate([np.cos(angles), np.sin(angles)], -1), rtol=1e-5, atol=1e-5)
