"""The attention kernels (models/attention.py), the Pallas ones interpreted on this CPU: the forward pass, its
gradient and its JVP against a float64 numpy softmax attention (the JVP against a float64 central difference of it),
with several key blocks so that the online softmax's rescaling matters; which network a JVP runs."""

import jax
from jax.experimental.pallas import tpu as pltpu
import jax.numpy as jnp
import numpy as np
import pytest

from cm_jax.models import attention, build_model


def _jnp_reference(q, k, v):
  """softmax(q k^T / sqrt(d)) v in plain jnp over [B, L, H, d] (float64 under jax.enable_x64)."""
  s = jnp.einsum('bqhd,bkhd->bhqk', q, k) / np.sqrt(q.shape[-1])
  return jnp.einsum('bhqk,bkhd->bqhd', jax.nn.softmax(s, axis=-1), v)


def _reference(q, k, v):
  """The float64 reference as numpy."""
  with jax.enable_x64():
    return np.asarray(_jnp_reference(q, k, v))


def _central_difference(q, k, v, dq, dk, dv, h=1e-5):
  """d/dh of the float64 reference along (dq, dk, dv)."""
  return (_reference(q + h * dq, k + h * dk, v + h * dv) - _reference(q - h * dq, k - h * dk, v - h * dv)) / (2 * h)


def _f32(*arrays):
  return [jnp.asarray(x, jnp.float32) for x in arrays]


@pytest.fixture
def small_blocks(monkeypatch):
  """Flash kernels from 128 positions in blocks of 128: 256 positions are two query and two key blocks."""
  monkeypatch.setattr(attention, 'FLASH_MIN_LENGTH', {'flash': 128, 'flash_jvp': 128})
  monkeypatch.setattr(attention, 'FLASH_BLOCK', 128)


def _inputs(seed=0, shape=(2, 256, 2, 32)):
  rng = np.random.default_rng(seed)
  return [rng.standard_normal(shape) * scale for scale in (1.5, 1.5, 1.0, 1.0, 1.0, 1.0)]  # q k v dq dk dv


@pytest.mark.parametrize('block, shape', [(128, (2, 256, 2, 32)), (256, (1, 384, 1, 16))])
def test_forward_mode_kernel_and_its_tangent_match_float64(monkeypatch, block, shape):
  """Blocks of 128 over 256 positions (2 query and 2 key blocks), and 384 positions with 256-position blocks: the
  block shrinks to 128, which divides the length (3 blocks, every position attended)."""
  monkeypatch.setattr(attention, 'FLASH_MIN_LENGTH', {'flash': 128, 'flash_jvp': 128})
  monkeypatch.setattr(attention, 'FLASH_BLOCK', block)
  q, k, v, dq, dk, dv = _inputs(0, shape)
  with pltpu.force_tpu_interpret_mode():
    out, tangent = jax.jit(lambda *a: jax.jvp(lambda *b: attention.attention(*b, kernel='flash_jvp'), a[:3], a[3:]))(
        *_f32(q, k, v, dq, dk, dv))
    primal_only = attention.attention(*_f32(q, k, v), kernel='flash_jvp')
  expected = _central_difference(q, k, v, dq, dk, dv)
  np.testing.assert_allclose(out, _reference(q, k, v), atol=2e-6)
  np.testing.assert_allclose(primal_only, _reference(q, k, v), atol=2e-6)
  np.testing.assert_allclose(tangent, expected, atol=2e-5)
  assert np.abs(expected).max() > 0.5  # a tangent of size, not a vanishing one


def test_flash_kernel_and_its_gradient_match_float64(small_blocks):
  q, k, v, cotangent = _inputs(1)[:4]
  loss = lambda q, k, v, kernel: jnp.sum(attention.attention(q, k, v, kernel=kernel) * cotangent)
  with pltpu.force_tpu_interpret_mode():
    out = attention.attention(*_f32(q, k, v), kernel='flash')
    grads = jax.grad(loss, argnums=(0, 1, 2))(*_f32(q, k, v), 'flash')
  np.testing.assert_allclose(out, _reference(q, k, v), atol=2e-6)
  with jax.enable_x64():  # the gradient of the float64 reference, by jax.grad of plain jnp
    reference = jax.grad(lambda *a: jnp.sum(_jnp_reference(*a) * cotangent), argnums=(0, 1, 2))(q, k, v)
  for got, want in zip(grads, reference):
    np.testing.assert_allclose(got, want, atol=5e-5)


@pytest.mark.parametrize('batch', [4, 2])
def test_under_a_mesh_each_device_runs_the_kernels_on_its_shard(small_blocks, batch):
  """Traced under a 4-device abstract mesh (as the train step is), the kernels run in jax.shard_map: XLA cannot
  partition a Mosaic kernel. A batch of 4 splits over the devices, a batch of 2 runs whole on each."""
  q, k, v, dq, dk, dv = (x[:batch] for x in _inputs(2, (4, 256, 2, 32)))
  mesh = jax.make_mesh((2, 2), ('data', 'fsdp'), axis_types=(jax.sharding.AxisType.Auto,) * 2,
                       devices=jax.devices()[:4])

  def step(q, k, v, dq, dk, dv):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      tangent = jax.jvp(lambda *a: attention.attention(*a, kernel='flash_jvp'), (q, k, v), (dq, dk, dv))[1]
      grad = jax.grad(lambda q: jnp.sum(attention.attention(q, k, v, kernel='flash') * dv))(q)
    return tangent, grad

  args = [jax.device_put(jnp.asarray(x, jnp.float32), jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(
      ('data', 'fsdp') if batch == 4 else None))) for x in (q, k, v, dq, dk, dv)]
  with pltpu.force_tpu_interpret_mode():
    assert 'shard_map' in str(jax.make_jaxpr(step)(*args))
    tangent, grad = jax.jit(step)(*args)
  np.testing.assert_allclose(tangent, _central_difference(q, k, v, dq, dk, dv), atol=2e-5)
  with jax.enable_x64():
    reference = jax.grad(lambda q: jnp.sum(_jnp_reference(q, k, v) * dv))(q)
  np.testing.assert_allclose(grad, reference, atol=5e-5)


def test_short_sequences_stay_on_xla_and_unknown_kernels_are_refused():
  q = jnp.ones((1, 64, 1, 8))
  jaxpr = str(jax.make_jaxpr(lambda q: attention.attention(q, q, q, kernel='flash'))(q))
  assert 'pallas_call' not in jaxpr  # 64 < FLASH_MIN_LENGTH: XLA's attention, runnable on any backend
  with pytest.raises(ValueError, match='attention_kernel'):
    attention.attention(q, q, q, kernel='splash')


def test_forward_mode_swaps_only_the_flash_kernel():
  adm = dict(name='adm', channels=8, channel_mult=(1,), num_res_blocks=1, attn_resolutions=(4,), num_classes=0)
  assert attention.forward_mode(build_model(dict(adm, attention_kernel='flash'))).attention_kernel == 'flash_jvp'
  assert attention.forward_mode(build_model(adm)).attention_kernel == 'xla'
  mlp = build_model(dict(name='mlp'))
  assert attention.forward_mode(mlp) is mlp
