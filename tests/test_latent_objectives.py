"""LCD and LCF losses, recomputed in numpy from the formulas of the reference sheet (section 7) on the same random
draws: the skipping pair, the noise, the guidance scale; and LCM-LoRA's adapters (models/lora.py).

The networks are linear in x so that numpy can follow them: F(x, t, c, s) = (w + t / 1000 + v[c] + g s) x, with
v[-1] = 0 (the unconditional branch) and the g s term only for a network with a guidance input.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from cm_jax.models import build_model
from cm_jax.models import lora
from cm_jax.models.apply import network
from cm_jax.objectives import make_objective
from cm_jax.objectives.latent import make_lcd, make_lcf
from cm_jax.parameterization import VP
from test_vp import ALPHA, SIGMA

B, D = 8, 4


class Linear(nn.Module):
  num_classes: int = 3
  label_dropout: float = 0.1
  guidance_embedding: bool = False

  @nn.compact
  def __call__(self, x, c_noise, cond=None, train=False, guidance=None):
    w, g = self.param('w', nn.initializers.zeros, ()), self.param('g', nn.initializers.zeros, ())
    v = self.param('v', nn.initializers.zeros, (self.num_classes,))
    coef = w + c_noise / 1000.0 + jnp.where(cond >= 0, v[jnp.maximum(cond, 0)], 0.0)
    if self.guidance_embedding:
      coef = coef + g * guidance
    return coef[:, None] * x


def _np_eps(p, x, t, cond, s=None):
  coef = p['w'] + t / 1000.0 + np.where(cond >= 0, np.asarray(p['v'])[np.maximum(cond, 0)], 0.0)
  if s is not None:
    coef = coef + p['g'] * s
  return coef[:, None] * x


def _np_f(p, x, t, cond, s):
  """LCM's f = c_skip x + c_out (x - sigma eps) / alpha with u = 10 t."""
  u = 10.0 * t
  c_skip, c_out = 0.25 / (u**2 + 0.25), u / np.sqrt(u**2 + 0.25)
  x0 = (x - SIGMA[t][:, None] * _np_eps(p, x, t, cond, s)) / ALPHA[t][:, None]
  return c_skip[:, None] * x + c_out[:, None] * x0


def _config(name='lcd', guidance_scale=(1.0, 3.0), target_ema=0.0, distance='l2'):
  return ml_collections.ConfigDict(dict(
      model=dict(num_classes=3, label_dropout=0.1), teacher=dict(init=False),
      parameterization=dict(name='vp', num_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                            beta_schedule='scaled_linear', prediction='epsilon', sigma_data=0.5, timestep_scaling=10.0),
      objective=dict(name=name, skip=20, guidance_scale=guidance_scale, target_ema=target_ema, distance=distance,
                     distance_c=0.0)))


STUDENT = {'w': 0.3, 'g': 0.05, 'v': np.array([0.1, -0.2, 0.3])}
TARGET = {'w': 0.25, 'g': 0.02, 'v': np.array([0.0, -0.1, 0.2])}
TEACHER = {'w': 0.5, 'g': 0.0, 'v': np.array([0.2, -0.1, 0.4])}


def _draws(rng):
  """The loss's own draws, replayed: t = 20 i + 19 for i ~ U{0..49}, t_prev = max(t - 20, 0), eps, s ~ U[1, 3]."""
  rng_t, rng_eps, _, rng_s = jax.random.split(rng, 4)
  t = 20 * np.asarray(jax.random.randint(rng_t, (B,), 0, 50)) + 19
  eps = np.asarray(jax.random.normal(rng_eps, (B, D)), np.float64)
  s = np.asarray(jax.random.uniform(rng_s, (B,), minval=1.0, maxval=3.0), np.float64)
  return t, np.maximum(t - 20, 0), eps, s


@pytest.mark.parametrize('target_ema', [0.0, 0.95])
def test_lcd_loss_is_the_guided_ddim_step_of_the_reference(target_ema):
  """x_hat = alpha' x0_g + sigma' eps_g with (x0_g, eps_g) = u + s (c - u) of the teacher at (x_t, t); the loss is
  mean_D (f_theta(x_t, t; s) - f_theta-(x_hat, t'; s))^2, theta- = sg(theta) or the EMA target; no gradient flows
  through the target."""
  rng = jax.random.PRNGKey(3)
  x0 = np.random.default_rng(0).standard_normal((B, D))
  cond = np.array([0, 1, 2, 0, 1, 2, 0, 1])
  objective = make_lcd(_config(target_ema=target_ema), Linear(guidance_embedding=True), VP())
  inputs = {'teacher': TEACHER, 'target': TARGET if target_ema else None}
  batch = {'image': jnp.asarray(x0, jnp.float32), 'label': jnp.asarray(cond)}
  loss, metrics = objective.loss(STUDENT, {}, inputs, batch, rng, 0)

  t, t_prev, eps, s = _draws(rng)
  x_t = ALPHA[t][:, None] * x0 + SIGMA[t][:, None] * eps
  x0_of = lambda e: (x_t - SIGMA[t][:, None] * e) / ALPHA[t][:, None]
  eps_c, eps_u = _np_eps(TEACHER, x_t, t, cond), _np_eps(TEACHER, x_t, t, -np.ones(B, int))
  x0_g = x0_of(eps_u) + s[:, None] * (x0_of(eps_c) - x0_of(eps_u))
  eps_g = eps_u + s[:, None] * (eps_c - eps_u)
  x_hat = ALPHA[t_prev][:, None] * x0_g + SIGMA[t_prev][:, None] * eps_g
  target = _np_f(TARGET if target_ema else STUDENT, x_hat, t_prev, cond, s)
  expected = np.mean((_np_f(STUDENT, x_t, t, cond, s) - target) ** 2)
  np.testing.assert_allclose(float(loss), expected, rtol=2e-4)
  np.testing.assert_allclose(float(metrics['guidance_scale']), s.mean(), rtol=1e-5)
  assert objective.sampler.label(2) == '2-step' and objective.distils == 'vp'
  assert (objective.target_rate is None) == (target_ema == 0.0)

  # The gradient is that of mean (f_theta(x_t) - const)^2.
  def reference(params):
    coef = params['w'] + t / 1000.0 + params['v'][cond] + params['g'] * s
    u = 10.0 * t
    c_skip, c_out = 0.25 / (u**2 + 0.25), u / jnp.sqrt(u**2 + 0.25)
    x0_hat = (x_t - SIGMA[t][:, None] * coef[:, None] * x_t) / ALPHA[t][:, None]
    return jnp.mean((c_skip[:, None] * x_t + c_out[:, None] * x0_hat - target) ** 2)
  grads = jax.grad(lambda p: objective.loss(p, {}, inputs, batch, rng, 0)[0])(
      jax.tree.map(jnp.float32, STUDENT))
  expected_grads = jax.grad(reference)(jax.tree.map(jnp.float32, STUDENT))
  for k in STUDENT:
    np.testing.assert_allclose(grads[k], expected_grads[k], rtol=2e-3, atol=1e-6)


def test_lcf_is_the_one_sample_estimate_without_a_teacher():
  """LCF: x_hat = alpha' x0 + sigma' eps (the same eps), the fixed s fed to the student; no teacher is read."""
  rng = jax.random.PRNGKey(5)
  x0 = np.random.default_rng(1).standard_normal((B, D))
  cond = np.array([2, 1, 0, 0, 1, 2, 2, 1])
  objective = make_lcf(_config('lcf', guidance_scale=(2.0, 2.0)), Linear(guidance_embedding=True), VP())
  batch = {'image': jnp.asarray(x0, jnp.float32), 'label': jnp.asarray(cond)}
  loss, _ = objective.loss(STUDENT, {}, {'teacher': None, 'target': None}, batch, rng, 0)
  t, t_prev, eps, _ = _draws(rng)
  s = np.full(B, 2.0)
  x_t = ALPHA[t][:, None] * x0 + SIGMA[t][:, None] * eps
  x_prev = ALPHA[t_prev][:, None] * x0 + SIGMA[t_prev][:, None] * eps
  expected = np.mean((_np_f(STUDENT, x_t, t, cond, s) - _np_f(STUDENT, x_prev, t_prev, cond, s)) ** 2)
  np.testing.assert_allclose(float(loss), expected, rtol=2e-4)
  assert objective.distils is None


def test_latent_objectives_refuse_bad_settings():
  with pytest.raises(ValueError, match='LCF has no teacher to guide'):
    make_lcf(_config('lcf', guidance_scale=(1.0, 3.0)), Linear(guidance_embedding=True), VP())
  with pytest.raises(ValueError, match="needs parameterization.name='vp'"):
    from cm_jax.parameterization import EDM  # pylint: disable=g-import-not-at-top
    make_lcd(_config(), Linear(guidance_embedding=True), EDM())
  with pytest.raises(ValueError, match='objective.skip=7'):
    c = _config()
    c.objective.skip = 7
    make_lcd(c, Linear(guidance_embedding=True), VP())
  with pytest.raises(ValueError, match='label_dropout > 0'):
    make_lcd(_config(), Linear(guidance_embedding=True, label_dropout=0.0), VP())
  with pytest.raises(ValueError, match='Unknown distance'):
    make_lcd(_config(distance='huber'), Linear(guidance_embedding=True), VP())


# ----------------------------------------------------------------------------------------------------------
# LoRA.
# ----------------------------------------------------------------------------------------------------------
class DenseConv(nn.Module):
  """A dense layer on channels, then a strided 3x3 conv: the two kernels LoRA adapts."""

  @nn.compact
  def __call__(self, x, c_noise, cond=None, train=False):
    h = nn.Dense(5, name='dense')(x)
    return nn.Conv(3, (3, 3), strides=(2, 2), padding='SAME', name='conv')(h)


def _random_adapters(params, rank, seed):
  """Adapters with both factors random (B = 0 at init would hide a wrong branch)."""
  adapters = lora.init(jax.random.PRNGKey(seed), params, ['dense/kernel', 'conv/kernel'], rank)
  return jax.tree.map(lambda a: a + jax.random.normal(jax.random.PRNGKey(seed + 1), a.shape), adapters)


def _count(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def test_lora_parameter_count_and_rule_errors():
  model = build_model(dict(name='mlp', hidden=16, depth=2))
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 6)), jnp.zeros((1,)))['params']
  paths = lora.select(params, (r'block_\d/dense_\d/kernel$',))
  assert paths == [f'block_{i}/dense_{j}/kernel' for i in (0, 1) for j in (0, 1)]
  adapters = lora.init(jax.random.PRNGKey(1), params, paths, rank=3)
  assert _count(adapters) == 4 * 3 * (16 + 16)  # r (d_in + d_out) per adapted kernel
  conv = DenseConv().init(jax.random.PRNGKey(0), jnp.zeros((1, 4, 4, 2)), jnp.zeros((1,)))['params']
  assert _count(lora.init(jax.random.PRNGKey(1), conv, ['conv/kernel'], rank=2)) == 2 * (3 * 3 * 5 + 3)
  assert not np.any(np.asarray(adapters['block_0']['dense_0']['kernel']['b']))  # B = 0: starts as the base
  with pytest.raises(ValueError, match=r"lora.rules entry 'attn' matches no kernel .*block_0/dense_0/kernel"):
    lora.select(params, ('attn',))


def test_lora_unmerged_equals_merged_equals_numpy():
  """y = x W + b + (alpha / r) (x A) B for the dense layer (numpy); the conv's un-merged branch conv(x, A) B equals the
  merged conv(x, W + (alpha / r) A B)."""
  model = DenseConv()
  x = jax.random.normal(jax.random.PRNGKey(2), (2, 4, 4, 2))
  params = model.init(jax.random.PRNGKey(0), x, jnp.zeros((2,)))['params']
  adapters = _random_adapters(params, rank=2, seed=3)
  scale = 0.7
  unmerged = network(model, lora.LoRAParams(params, adapters, scale))(x, jnp.zeros((2,)))
  merged = model.apply({'params': lora.merge(params, (adapters, scale))}, x, jnp.zeros((2,)))
  np.testing.assert_allclose(unmerged, merged, rtol=1e-5, atol=1e-5)
  a, b = (np.asarray(adapters['dense']['kernel'][k]) for k in ('a', 'b'))
  hidden = np.asarray(x) @ np.asarray(params['dense']['kernel']) + np.asarray(params['dense']['bias'])
  hidden = hidden + scale * (np.asarray(x) @ a) @ b
  only_dense = lambda p: nn.Dense(5).apply({'params': p['dense']}, x)
  np.testing.assert_allclose(only_dense(lora.merge(params, (adapters, scale))), hidden, rtol=1e-5, atol=1e-5)


def test_lora_adapters_combine_by_a_weighted_sum_of_their_updates():
  """merge(base, (A1, s1), (A2, s2)) = W + s1 A1 B1 + s2 A2 B2 (LCM-LoRA's acceleration vector plus a style LoRA)."""
  params = DenseConv().init(jax.random.PRNGKey(0), jnp.zeros((1, 4, 4, 2)), jnp.zeros((1,)))['params']
  first, second = _random_adapters(params, 2, 5), _random_adapters(params, 3, 9)
  merged = lora.merge(params, (first, 0.5), (second, -1.5))
  for name in ('dense', 'conv'):
    w = np.asarray(params[name]['kernel'])
    update = lambda ad: np.einsum('...r,ro->...o', np.asarray(ad[name]['kernel']['a']), np.asarray(ad[name]['kernel']['b']))
    np.testing.assert_allclose(merged[name]['kernel'], w + 0.5 * update(first) - 1.5 * update(second), rtol=1e-5,
                               atol=1e-5)
    np.testing.assert_array_equal(merged[name]['bias'], params[name]['bias'])


def test_lora_objective_starts_as_its_teacher_and_checks_its_settings():
  """With B = 0 the LoRA student is the teacher: its LCD loss equals the full-network loss at the teacher's
  parameters. LoRA needs a distilled teacher and a network without guidance input."""
  config = _config(guidance_scale=(2.0, 2.0))
  config.lora = ml_collections.ConfigDict(dict(rank=2, alpha=4.0, rules=('w$',)))
  model = Linear(num_classes=3)
  with pytest.raises(ValueError, match="entry 'w\\$' matches no kernel"):  # scalars are not kernels
    jax.eval_shape(lambda: make_objective(config, model).init_params(
        model, jax.random.PRNGKey(0), (jnp.zeros((1, D)), jnp.zeros((1,)), jnp.zeros((1,), jnp.int32))))
  mlp_config = _config(guidance_scale=(2.0, 2.0))
  mlp_config.lora = ml_collections.ConfigDict(dict(rank=2, alpha=4.0, rules=('kernel$',)))
  mlp_config.model = ml_collections.ConfigDict(dict(num_classes=3, label_dropout=0.1))
  mlp = build_model(dict(name='mlp', hidden=8, depth=1, num_classes=3, label_dropout=0.1, time_embedding='positional',
                         time_scale=1.0))
  sample_input = (jnp.zeros((1, D)), jnp.zeros((1,)), jnp.zeros((1,), jnp.int32))
  teacher = mlp.init(jax.random.PRNGKey(0), *sample_input)['params']
  teacher = jax.tree.map(lambda p: p + 0.1, teacher)
  objective = make_objective(mlp_config, mlp)
  adapters = objective.init_params(mlp, jax.random.PRNGKey(1), sample_input)
  batch = {'image': jax.random.normal(jax.random.PRNGKey(2), (B, D)), 'label': jnp.arange(B) % 3}
  with_lora, _ = objective.loss(adapters, {}, {'teacher': teacher, 'target': None}, batch, jax.random.PRNGKey(4), 0)
  full = make_lcd(mlp_config, mlp, VP())
  plain, _ = full.loss(teacher, {}, {'teacher': teacher, 'target': None}, batch, jax.random.PRNGKey(4), 0)
  np.testing.assert_allclose(float(with_lora), float(plain), rtol=1e-5)
  for merged, base in zip(jax.tree.leaves(objective.sample_params(adapters, {'teacher': teacher})),
                          jax.tree.leaves(teacher), strict=True):
    np.testing.assert_allclose(merged, base, rtol=1e-6)
  guided = _config(guidance_scale=(1.0, 3.0))
  guided.lora = mlp_config.lora
  with pytest.raises(ValueError, match='LoRA adapts the teacher'):
    make_objective(guided, mlp.clone(guidance_embedding=True))
  unsupervised = ml_collections.ConfigDict(dict(mlp_config.to_dict(), objective=dict(
      name='lcf', skip=20, guidance_scale=(1.0, 1.0), target_ema=0.0, distance='l2', distance_c=0.0)))
  with pytest.raises(ValueError, match='distils none'):
    make_objective(unsupervised, mlp)
