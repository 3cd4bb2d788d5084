"""The one sampler over both noise processes: the parameterisation interface it uses and the guidance scale.

The multistep consistency sampler on the exact consistency function of Gaussian data is tested in
test_consistency_objectives.py (EDM, 1-3 steps) and test_continuous.py (TrigFlow, 1-2 steps, and the Heun branch).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from cm_jax import sampling
from cm_jax.models import build_model
from cm_jax.parameterization import EDM, TrigFlow
from oracle import EPS, OracleNet

SD = 0.5
MLP = dict(name='mlp', hidden=16, depth=1, num_classes=3, time_embedding='positional', time_scale=1000.0)
SHAPE = (64, 4)


def _config(guidance_scale=1.0):
  return ml_collections.ConfigDict(dict(parameterization=dict(rho=7.0), sampling=dict(
      mid_sigmas=(SD * np.tan(1.1),), mid_indices=(), index_grid_size=18, guidance_scale=guidance_scale)))


def _params(model, seed=0):
  """Parameters with every entry non-zero (N(0, 0.3^2) added to the initial ones), so every input matters."""
  init = model.init(jax.random.PRNGKey(seed), jnp.zeros(SHAPE), jnp.zeros(SHAPE[:1]), jnp.zeros(SHAPE[:1], jnp.int32))
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda p: p + 0.3 * rng.standard_normal(p.shape).astype(np.float32), init['params'])


def _sample_fn(config, model, process, sampler=sampling.CONSISTENCY):
  return jax.jit(sampler.build(config, model, process), static_argnames=('shape', 'num_steps'))


@pytest.mark.parametrize('process', [EDM(sigma_data=SD), TrigFlow(sigma_data=SD)], ids=['edm', 'trigflow'])
def test_renoise_and_change_of_variables(process):
  """renoise(x, z, t) of a clean x has the process's closed form; x_from_sigma(x + sigma z) at t_from_sigma(sigma)
  is the process's own x_t (TrigFlow: cos(t) x + sin(t) sd z; EDM: the identity, t = sigma)."""
  rng = np.random.default_rng(0)
  x, z = (jnp.asarray(rng.standard_normal(SHAPE), jnp.float32) for _ in range(2))
  sigma = jnp.asarray(rng.uniform(0.1, 10.0, SHAPE[0]), jnp.float32)
  t = process.t_from_sigma(sigma)
  moved = process.x_from_sigma(x + sigma[:, None] * z, sigma)
  if isinstance(process, TrigFlow):
    expected = jnp.cos(t)[:, None] * x + jnp.sin(t)[:, None] * SD * z
    np.testing.assert_allclose(process.renoise(x, z, t), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(moved, expected, rtol=1e-5, atol=1e-5)
    assert process.t_max == pytest.approx(np.arctan(80.0 / SD))
    np.testing.assert_allclose(process.prior(z), SD * z)
  else:
    np.testing.assert_array_equal(t, sigma)
    np.testing.assert_allclose(moved, x + sigma[:, None] * z)
    expected = x + jnp.sqrt(sigma**2 - process.sigma_min**2)[:, None] * z  # x is clean at eps (the boundary)
    np.testing.assert_allclose(process.renoise(x, z, sigma), expected, rtol=1e-6)
    assert process.t_max == 80.0
    np.testing.assert_allclose(process.prior(z), 80.0 * z)


@pytest.mark.parametrize('process', [EDM(sigma_data=SD), TrigFlow(sigma_data=SD)], ids=['edm', 'trigflow'])
def test_consistency_sampler_feeds_the_guidance_scale(process):
  """A guidance-input network's samples change with s; without an argument s = sampling.guidance_scale."""
  model = build_model(dict(MLP, guidance_embedding=True))
  params, cond = _params(model), jnp.arange(SHAPE[0]) % 3
  sample = _sample_fn(_config(guidance_scale=2.5), model, process)
  draw = lambda guidance=None: sample(params, jax.random.PRNGKey(0), cond, shape=SHAPE, num_steps=2,
                                      guidance=guidance)
  at_1, at_3 = draw(1.0), draw(jnp.full((SHAPE[0],), 3.0))
  assert np.all(np.abs(np.asarray(at_3 - at_1)).max(-1) > 1e-4)
  np.testing.assert_array_equal(draw(), draw(2.5))


def test_guidance_scale_for_a_network_without_the_input_stops_with_a_clear_error():
  model = build_model(MLP)
  with pytest.raises(ValueError, match=r'sampling.guidance_scale=2.0 needs .*model.guidance_embedding=True'):
    sampling.CONSISTENCY.build(_config(guidance_scale=2.0), model, TrigFlow(sigma_data=SD))
  sample = sampling.CONSISTENCY.build(_config(), model, TrigFlow(sigma_data=SD))
  with pytest.raises(ValueError, match='model.guidance_embedding=False'):
    sample(_params(model), jax.random.PRNGKey(0), jnp.zeros(SHAPE[:1], jnp.int32), shape=SHAPE, num_steps=1,
           guidance=2.0)


class _Linear(nn.Module):
  """F(x_in, c_noise) = b x_in: with b = -3 the TrigFlow consistency function is (cos t + 3 sin t) x."""
  b: float

  @nn.compact
  def __call__(self, x_in, c_noise, cond=None, train=False):
    return self.b * x_in


def _clip_config(clip, **sampling_keys):
  config = _config()
  config.sampling.update(dict(mid_sigmas=(2.0, 0.5), clip_denoised=clip, **sampling_keys))
  return config


@pytest.mark.parametrize('process', [EDM(sigma_data=SD), TrigFlow(sigma_data=SD)], ids=['edm', 'trigflow'])
@pytest.mark.parametrize('clip', [False, True])
def test_clip_denoised_clamps_every_x0_estimate(process, clip):
  """3-step sampling with a consistency function that leaves [-1, 1] (EDM: the oracle f* + 2 x; TrigFlow:
  (cos t + 3 sin t) x) equals the numpy recursion x <- c(k(t) renoise(x, z, t)), c = clip to [-1, 1] or the
  identity, with CM's renoise (EDM: x + sqrt(t^2 - eps^2) z; TrigFlow: cos(t) x + sin(t) sd z) and the same draws."""
  if isinstance(process, EDM):
    model, params, ts = OracleNet(), {'a': 2.0, 'gate': 1.0}, np.array([80.0, 2.0, 0.5])
    k = lambda t: np.sqrt(EPS**2 + SD**2) / np.sqrt(t**2 + SD**2) + 2.0
    renoise = lambda x, z, t: x + np.sqrt(t**2 - EPS**2) * z
    start = 80.0
  else:
    model, params, ts = _Linear(-3.0), {}, np.arctan(np.array([80.0, 2.0, 0.5]) / SD)
    k = lambda t: np.cos(t) + 3.0 * np.sin(t)
    renoise = lambda x, z, t: np.cos(t) * x + np.sin(t) * SD * z
    start = SD
  sample = _sample_fn(_clip_config(clip), model, process)
  rng = jax.random.PRNGKey(3)
  out = np.asarray(sample(params, rng, None, shape=SHAPE, num_steps=3), np.float64)
  rng_z, rng_noise = jax.random.split(rng)  # the sampler's draws
  noise = [np.asarray(jax.random.normal(jax.random.fold_in(rng_noise, i), SHAPE), np.float64) for i in range(2)]
  c = (lambda v: np.clip(v, -1.0, 1.0)) if clip else (lambda v: v)
  x = k(ts[0]) * start * np.asarray(jax.random.normal(rng_z, SHAPE), np.float64)
  assert np.abs(x).max() > 1.5  # the one-step estimate leaves the data range
  x = c(x)
  for z, t in zip(noise, ts[1:]):
    x = c(k(t) * renoise(x, z, t))
  np.testing.assert_allclose(out, x, rtol=1e-4, atol=1e-5)
  assert (np.abs(out).max() <= 1.0) == clip


def test_clip_denoised_refuses_a_latent_run():
  config = _clip_config(True)
  config.latent = ml_collections.ConfigDict(dict(autoencoder='runs/digits_autoencoder'))
  with pytest.raises(ValueError, match=r'sampling.clip_denoised=True clamps pixels .*\(latent.autoencoder='):
    sampling.CONSISTENCY.build(config, build_model(MLP), EDM(sigma_data=SD))
