"""Improved latent consistency training (Dao et al. 2025): the adaptive scale c, the early-time diffusion loss, the
Cauchy iCT loss recomputed in numpy, minibatch optimal transport against brute force, and non-scaling LayerNorm."""

import itertools
import math

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from cm_jax import couplings
from cm_jax import schedules
from cm_jax.models import build_model
from cm_jax.models.layers import feature_norm
from cm_jax.objectives import make_objective
from cm_jax.objectives.discrete import diffusion_loss
from oracle import EDM_, EPS, SD, T, OracleNet


# ----------------------------------------------------------------------------------------------------------
# The scale c and the diffusion loss's samples.
# ----------------------------------------------------------------------------------------------------------
def test_adaptive_c_by_hand():
  """0.00054 sqrt(D) while N - 1 <= s0, then exp(-1.15 ln(N - 1) - 0.85): 0.0136 at 20, 0.00025 at 640."""
  c = lambda n: float(schedules.lct_adaptive_c(n, 10, 64))
  assert c(2) == pytest.approx(0.00054 * 8) and c(11) == pytest.approx(0.00432)
  assert c(21) == pytest.approx(0.013635, rel=1e-4) and c(21) == pytest.approx(math.exp(-1.15 * math.log(20) - 0.85))
  assert c(641) == pytest.approx(2.5357e-4, rel=1e-3)


def test_the_diffusion_loss_takes_the_quarter_of_pairs_nearest_sigma_min():
  """From sigma_max, pair i = N - 2 - n counts when i >= floor(0.75 N): N = 11 -> n in {0, 1}; N = 5 -> n = 0;
  N = 2 -> none."""
  near = lambda n, N: np.asarray(schedules.near_sigma_min(np.asarray(n), N)).tolist()
  assert near(range(10), 11) == [True, True] + [False] * 8
  assert near(range(4), 5) == [True, False, False, False]
  assert near([0], 2) == [False]
  pred, x0, sigma = jnp.ones((3, 4)), jnp.zeros((3, 4)), jnp.array([0.5, 1.0, 2.0])
  np.testing.assert_allclose(diffusion_loss(EDM_, pred, x0, sigma, jnp.array([True, False, True])),
                             ((1 / 0.25 + 4) + (1 / 4.0 + 4)) / 2, rtol=1e-6)
  assert float(diffusion_loss(EDM_, pred, x0, sigma, jnp.zeros(3, bool))) == 0.0  # none: 0, not NaN


# ----------------------------------------------------------------------------------------------------------
# The iCT loss with the options on, replayed in numpy.
# ----------------------------------------------------------------------------------------------------------
def _ict_config(**options):
  return ml_collections.ConfigDict(dict(
      objective=dict(dict(name='ict', s0=10, s1=80, p_mean=-1.1, p_std=2.0, distance='cauchy', c_schedule='adaptive',
                          distance_c=0.0, diffusion_loss_weight=5.0, diffusion_loss_fraction=0.25, coupling='none',
                          sinkhorn_epsilon=0.05), **options),
      parameterization=dict(name='edm', sigma_data=SD, sigma_min=EPS, sigma_max=T, rho=7.0),
      teacher=dict(workdir='', init=False), model=dict(num_classes=0), train=dict(num_steps=8000),
      sampling=dict(mid_sigmas=(), mid_indices=(), index_grid_size=18, guidance_scale=1.0)))


@pytest.mark.parametrize('step', [0, 4000])
def test_ict_with_cauchy_adaptive_c_and_diffusion_loss_by_numpy(step):
  """sum over the batch of (1/(s' - s)) log(1 + mean_D (f(x0 + s' z, s') - f(x0 + s z, s))^2 / (2 c^2)) / B
  + 5 (1/s'^2 + 1/sd^2) mean_D (f(x0 + s' z, s') - x0)^2 averaged over the pairs near sigma_min, with f = f* + a x
  above sigma_min (OracleNet) and f(x, sigma_min) = x."""
  a, batch_size, dim = 0.3, 256, 6
  config = _ict_config()
  objective = make_objective(config, OracleNet())
  x0 = np.asarray(SD * jax.random.normal(jax.random.PRNGKey(1), (batch_size, dim)), np.float64)
  rng = jax.random.PRNGKey(2)
  loss, metrics = objective.loss({'a': jnp.float32(a), 'gate': jnp.float32(1.0)}, {}, {'target': None},
                                 {'image': jnp.asarray(x0, jnp.float32)}, rng, step)

  num_scales = min(10 * 2 ** (step // math.floor(8000 / (math.log2(8) + 1))), 80) + 1  # K' = 2000
  rng_n, rng_z, _ = jax.random.split(rng, 3)
  logits = schedules.lognormal_index_logits(num_scales, 81, -1.1, 2.0)
  n = np.asarray(jax.random.categorical(rng_n, logits, shape=(batch_size,)))
  z = np.asarray(jax.random.normal(rng_z, x0.shape), np.float64)
  karras = lambda i: (EPS ** (1 / 7) + i / (num_scales - 1) * (T ** (1 / 7) - EPS ** (1 / 7))) ** 7
  s, s_next = karras(n)[:, None], karras(n + 1)[:, None]
  f = lambda x, sigma: x * (np.sqrt(EPS**2 + SD**2) / np.sqrt(sigma**2 + SD**2) + a * (sigma > 1.000001 * EPS))  # f(x, eps) = x
  pred, target = f(x0 + s_next * z, s_next), f(x0 + s * z, s)
  c = 0.00054 * math.sqrt(dim) if num_scales - 1 <= 10 else math.exp(-1.15 * math.log(num_scales - 1) - 0.85)
  consistency = np.mean(np.log1p(np.mean((pred - target) ** 2, -1) / (2 * c**2)) / (s_next - s)[:, 0])
  near = (num_scales - 2 - n) >= math.floor(0.75 * num_scales)
  per_sample = (1 / s_next[:, 0] ** 2 + 1 / SD**2) * np.mean((pred - x0) ** 2, -1)
  expected = consistency + 5.0 * per_sample[near].mean()
  assert near.any() and not near.all()
  np.testing.assert_allclose(float(metrics['distance_c']), c, rtol=1e-5)
  np.testing.assert_allclose(float(metrics['diffusion_loss']), per_sample[near].mean(), rtol=1e-4)
  np.testing.assert_allclose(float(loss), expected, rtol=1e-4)


def test_option_errors_before_compilation():
  with pytest.raises(ValueError, match="c_schedule='linear'"):
    make_objective(_ict_config(c_schedule='linear'), OracleNet())
  with pytest.raises(ValueError, match="objective.distance='l2' does not have"):
    make_objective(_ict_config(distance='l2'), OracleNet())
  with pytest.raises(ValueError, match='Unknown distance'):
    make_objective(_ict_config(distance='welsch'), OracleNet())
  with pytest.raises(ValueError, match="objective.coupling='hungarian'"):
    make_objective(_ict_config(coupling='hungarian'), OracleNet())
  with pytest.raises(ValueError, match='diffusion_loss_weight=-1'):
    make_objective(_ict_config(diffusion_loss_weight=-1.0), OracleNet())


# ----------------------------------------------------------------------------------------------------------
# Minibatch optimal transport.
# ----------------------------------------------------------------------------------------------------------
def _cost(x, z):
  return float(np.sum((np.asarray(x).reshape(len(x), -1) - np.asarray(z).reshape(len(z), -1)) ** 2))


def test_exact_coupling_is_optimal_against_brute_force():
  rng = np.random.default_rng(0)
  for trial in range(3):
    x, z = rng.standard_normal((2, 6, 2, 2)).astype(np.float32)
    best = min(_cost(x, z[list(p)]) for p in itertools.permutations(range(6)))
    for paired in (couplings.minibatch_ot(jnp.asarray(x), jnp.asarray(z)),
                   jax.jit(couplings.minibatch_ot)(jnp.asarray(x), jnp.asarray(z))):
      assert _cost(x, paired) == pytest.approx(best, rel=1e-5), trial
      assert sorted(map(tuple, np.asarray(paired).reshape(6, -1))) == sorted(map(tuple, z.reshape(6, -1)))


def test_couplings_pair_each_device_shard_on_its_own():
  """With 4 devices and a batch of 8, each device's 2 samples are paired among themselves, optimally."""
  mesh = jax.make_mesh((4,), ('data',), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:4])
  x, z = np.random.default_rng(1).standard_normal((2, 8, 3)).astype(np.float32)
  sharded = lambda a: jax.device_put(a, NamedSharding(mesh, P('data')))

  @jax.jit
  def pair(x, z, rng):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return couplings.couple('exact', x, z, rng), couplings.couple('sinkhorn', x, z, rng, 0.01)

  exact, entropic = (np.asarray(p) for p in pair(sharded(x), sharded(z), jax.random.PRNGKey(0)))
  for d in range(4):
    rows = slice(2 * d, 2 * d + 2)
    shard_best = min(_cost(x[rows], z[rows][list(p)]) for p in itertools.permutations(range(2)))
    assert _cost(x[rows], exact[rows]) == pytest.approx(shard_best, rel=1e-5)
    assert set(map(tuple, entropic[rows])) <= set(map(tuple, z[rows]))  # drawn within the shard
  with pytest.raises(ValueError, match='holds 1 sample'):
    pair(sharded(x[:4]), sharded(z[:4]), jax.random.PRNGKey(0))


def test_sinkhorn_coupling_is_close_to_the_exact_one():
  x, z = np.random.default_rng(2).standard_normal((2, 64, 4)).astype(np.float32)
  exact = _cost(x, couplings.minibatch_ot(jnp.asarray(x), jnp.asarray(z)))
  entropic = _cost(x, jax.jit(couplings.sinkhorn_coupling, static_argnums=3)(
      jnp.asarray(x), jnp.asarray(z), jax.random.PRNGKey(0), 0.01))
  assert entropic < 1.15 * exact < 1.15 * _cost(x, z)


# ----------------------------------------------------------------------------------------------------------
# Non-scaling LayerNorm.
# ----------------------------------------------------------------------------------------------------------
def test_non_scaling_layer_norm_by_hand():
  """y = (x - mean) / sqrt(var + eps) + b over all of a sample's (H, W, C), a bias per channel and no scale."""
  x = np.random.default_rng(3).standard_normal((2, 3, 3, 4)).astype(np.float32) * 2 + 1
  norm = feature_norm('nsln', 4, eps=1e-6)
  params = norm.init(jax.random.PRNGKey(0), x)['params']
  assert set(params) == {'bias'}
  bias = np.array([0.1, -0.2, 0.3, 0.0], np.float32)
  mean, var = x.mean((1, 2, 3), keepdims=True), x.var((1, 2, 3), keepdims=True)
  np.testing.assert_allclose(norm.apply({'params': {'bias': bias}}, x), (x - mean) / np.sqrt(var + 1e-6) + bias,
                             rtol=1e-4, atol=1e-5)
  mlp = build_model(dict(name='mlp', hidden=8, depth=1, norm='nsln'))
  mlp_params = mlp.init(jax.random.PRNGKey(0), jnp.zeros((1, 5)), jnp.zeros((1,)))['params']
  h = np.random.default_rng(4).standard_normal((2, 8)).astype(np.float32)
  from cm_jax.models.mlp import layer_norm  # pylint: disable=g-import-not-at-top
  ln = layer_norm('nsln', 'n')
  np.testing.assert_allclose(ln.apply({'params': {'bias': bias.repeat(2)}}, h),
                             (h - h.mean(-1, keepdims=True)) / np.sqrt(h.var(-1, keepdims=True) + 1e-6) + bias.repeat(2),
                             rtol=1e-4, atol=1e-5)
  assert not [p for p in flax.traverse_util.flatten_dict(mlp_params, sep='/') if p.endswith('scale')]


@pytest.mark.parametrize('network', [
    dict(name='unet', channels=8, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,)),
    dict(name='ncsnpp', channels=16, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.0),
    dict(name='adm', channels=16, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), num_classes=0,
         head_dim=8, dropout=0.0)], ids=['unet', 'ncsnpp', 'adm'])
def test_every_convolutional_network_offers_non_scaling_layer_norm(network):
  """norm='nsln' replaces every GroupNorm: no scale parameter anywhere, one bias per channel, the same output
  shape; 'group' keeps the scales."""
  shapes = {}
  for norm in ('group', 'nsln'):
    model = build_model(dict(network, norm=norm))
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 2)), jnp.zeros((1,)))['params']
    shapes[norm] = {p for p in flax.traverse_util.flatten_dict(params, sep='/') if p.endswith('/scale')}
  assert shapes['group'] and not shapes['nsln']
  with pytest.raises(ValueError, match="model.norm='layer'"):
    build_model(dict(network, norm='layer')).init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 2)), jnp.zeros((1,)))


def test_nsln_for_a_network_without_the_option_is_refused():
  with pytest.raises(ValueError, match=r"Unknown field\(s\) \['norm'\] for model 'autoencoder_kl'"):
    build_model(dict(name='autoencoder_kl', in_channels=1, norm='nsln'))
