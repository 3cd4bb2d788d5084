"""Multi-head attention softmax(q k^T / sqrt(d)) v for the networks' attention blocks, with its kernel chosen.

model.attention_kernel:
  'xla'   jax.nn.dot_product_attention: cuDNN's fused kernel on GPUs where it applies; on TPU XLA materialises the
          [B, H, L, L] scores (the bandwidth the ADM steps are bound by, BUILD_NOTES' pre-flight table).
  'flash' on TPU, the Pallas flash-attention kernels (jax.experimental.pallas.ops.tpu.flash_attention) for the
          forward pass and its gradient, and this module's forward-mode kernel for a JVP (sCM's JVP of flash
          attention): no [L, L] array in HBM in either. A Pallas TPU kernel runs on a TPU only (or interpreted:
          jax.experimental.pallas.tpu.force_tpu_interpret_mode, as the tests run it).

The forward-mode kernel computes O = softmax(S) V and its tangent in one pass over the key blocks, with
S = q k^T / sqrt(d) and dS = (dq k^T + q dk^T) / sqrt(d):
  dO = P dV + (P o dS) V - rowsum(P o dS) o O,   P = softmax(S),
accumulating P V, P dV + (P o dS) V and rowsum(P o dS) with the online softmax's running maximum and sum.
jax.grad cannot differentiate that kernel and jax.jvp cannot differentiate the flash kernel's custom VJP, so the
network runs 'flash' and the network an objective JVPs runs 'flash_jvp' (`forward_mode`): the same parameters, the
kernel that suits the derivative taken. Under jax.jvp, 'flash_jvp' gives the tangent dO from the forward-mode kernel
on stop-gradient inputs (dO carries no gradient: every objective stop-gradients its JVP's tangent) and O from
'flash' (XLA below its FLASH_MIN_LENGTH), so jax.grad differentiates the JVP's primal: MeanFlow trains on it. The
forward-mode kernel's own O is then discarded: an attention forward more per JVP. XLA does not partition Mosaic
kernels: traced under a mesh (jax.sharding.use_abstract_mesh, as the train step and the samplers are), each device
runs them on its batch shard through jax.shard_map.
"""

import functools

import jax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas.ops.tpu import flash_attention as tpu_flash
import jax.numpy as jnp

KERNELS = ('xla', 'flash')  # model.attention_kernel
FORWARD_MODE = {'flash': 'flash_jvp'}  # the kernel a JVP of the network runs instead
# The shortest sequence each Pallas kernel runs (shorter ones stay on 'xla'): measured on v5p at 256 positions, XLA's
# forward and backward are the faster, the forward-mode kernel 2.2x faster than XLA's JVP (BUILD_NOTES).
FLASH_MIN_LENGTH = {'flash': 512, 'flash_jvp': 256}
FLASH_BLOCK = 512  # query and key positions per kernel block
_LANES = 128  # row statistics are kept lane-replicated: (block_q, 128) VMEM tiles
_NT = (((1,), (1,)), ((), ()))  # contract the last dims: a b^T


def forward_mode(model):
  """The network an objective differentiates with jax.jvp: its 'flash' attention swapped for 'flash_jvp'."""
  kernel = getattr(model, 'attention_kernel', 'xla')
  return model.clone(attention_kernel=FORWARD_MODE[kernel]) if kernel in FORWARD_MODE else model


def attention(q, k, v, kernel: str = 'xla'):
  """softmax(q k^T / sqrt(d)) v over q, k, v [B, L, H, d] -> [B, L, H, d], with the kernel named (module docstring);
  the Pallas kernels run sequences of FLASH_MIN_LENGTH positions or more, in multiples of 128 ('xla' otherwise)."""
  if kernel not in KERNELS + tuple(FORWARD_MODE.values()):
    raise ValueError(f'model.attention_kernel={kernel!r}; expected one of {KERNELS}.')
  length = q.shape[1]
  if kernel == 'xla' or length < FLASH_MIN_LENGTH[kernel] or length % _LANES:
    return jax.nn.dot_product_attention(q, k, v)
  fn = _flash if kernel == 'flash' else flash_attention_jvp
  return _heads_first(_per_shard(fn, *map(_heads_first, (q, k, v))))


def _heads_first(t):
  """[B, L, H, d] <-> the Pallas kernels' [B, H, L, d]."""
  return jnp.swapaxes(t, 1, 2)


def _flash(q, k, v):
  """The Pallas flash-attention kernel (custom VJP) over [B, H, L, d]."""
  return tpu_flash.flash_attention(q, k, v, sm_scale=q.shape[-1] ** -0.5, block_sizes=_flash_blocks(q.shape[2]))


def _reverse_differentiable(q, k, v):
  """softmax(q k^T / sqrt(d)) v over [B, H, L, d] by 'flash' where it applies (`attention`), else by XLA."""
  length = q.shape[2]
  if length < FLASH_MIN_LENGTH['flash'] or length % _LANES:
    return _heads_first(jax.nn.dot_product_attention(*map(_heads_first, (q, k, v))))
  return _flash(q, k, v)


def _per_shard(fn, *arrays):
  """fn on each device's batch shard under the abstract mesh of the trace (the whole batch on every device when it
  does not split evenly); fn itself without a mesh."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return fn(*arrays)
  spec = jax.sharding.PartitionSpec(mesh.axis_names if arrays[0].shape[0] % mesh.size == 0 else None)
  return jax.shard_map(fn, in_specs=(spec,) * len(arrays), out_specs=spec, check_vma=False)(*arrays)


def _block(length: int) -> int:
  """The largest power-of-two block up to FLASH_BLOCK that divides the length (a multiple of 128)."""
  block = min(length, FLASH_BLOCK)
  while length % block:
    block //= 2
  return block


def _flash_blocks(length: int) -> tpu_flash.BlockSizes:
  b = _block(length)
  return tpu_flash.BlockSizes(block_q=b, block_k_major=b, block_k=b, block_b=1, block_q_major_dkv=b,
                              block_k_major_dkv=b, block_k_dkv=b, block_q_dkv=b, block_k_major_dq=b, block_k_dq=b,
                              block_q_dq=b)


@jax.custom_jvp
def flash_attention_jvp(q, k, v):
  """softmax(q k^T / sqrt(d)) v over [B, H, L, d]; its JVP's tangent is the forward-mode kernel's (module docstring)."""
  return _attention_and_tangent(q, k, v, None)[0]


@flash_attention_jvp.defjvp
def _flash_attention_jvp_rule(primals, tangents):
  """(O, dO): dO by the forward-mode kernel on stop-gradient inputs (so dO carries no gradient), O by
  `_reverse_differentiable`, so that jax.grad can differentiate a JVP's primal (MeanFlow's trained u)."""
  sg = lambda arrays: [jax.lax.stop_gradient(a) for a in arrays]
  return _reverse_differentiable(*primals), _attention_and_tangent(*sg(primals), sg(tangents))[1]


def _attention_and_tangent(q, k, v, tangents):
  """(O, dO) of the module docstring by the Pallas kernel (dO None without tangents)."""
  batch, heads, length, dim = q.shape
  bq = bk = _block(length)
  with_tangent = tangents is not None
  q_spec = pl.BlockSpec((None, None, bq, dim), lambda b, h, i, j: (b, h, i, 0))
  k_spec = pl.BlockSpec((None, None, bk, dim), lambda b, h, i, j: (b, h, j, 0))
  inputs, specs = [q, k, v], [q_spec, k_spec, k_spec]
  if with_tangent:
    inputs += list(tangents)
    specs += [q_spec, k_spec, k_spec]
  out = jax.ShapeDtypeStruct(q.shape, q.dtype)
  stats = pltpu.VMEM((bq, _LANES), jnp.float32)
  outs = pl.pallas_call(
      functools.partial(_kernel, scale=dim**-0.5, with_tangent=with_tangent),
      grid=(batch, heads, length // bq, length // bk),
      in_specs=specs,
      out_specs=[q_spec] * (2 if with_tangent else 1),
      out_shape=[out] * (2 if with_tangent else 1),
      scratch_shapes=[stats, stats, stats, pltpu.VMEM((bq, dim), jnp.float32), pltpu.VMEM((bq, dim), jnp.float32)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=('parallel', 'parallel', 'parallel', 'arbitrary')),
      cost_estimate=pl.CostEstimate(  # 2 matmuls of 2 L^2 d FLOPs per head, 6 with the tangent
          flops=(12 if with_tangent else 4) * batch * heads * length * length * dim,
          transcendentals=batch * heads * length * length,
          bytes_accessed=(len(inputs) + (2 if with_tangent else 1)) * q.size * q.dtype.itemsize),  # in + out
  )(*inputs)
  return (outs[0], outs[1]) if with_tangent else (outs[0], None)


def _kernel(*refs, scale, with_tangent):
  """One (query block, key block) step of the online softmax; the last key block writes O (and dO)."""
  if with_tangent:
    q_ref, k_ref, v_ref, dq_ref, dk_ref, dv_ref, o_ref, do_ref, m_ref, l_ref, s_ref, acc_o, acc_t = refs
  else:
    q_ref, k_ref, v_ref, o_ref, m_ref, l_ref, s_ref, acc_o, acc_t = refs
  j = pl.program_id(3)

  @pl.when(j == 0)
  def _start():
    m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, jnp.float32)
    for ref in (l_ref, s_ref, acc_o, acc_t):
      ref[...] = jnp.zeros(ref.shape, jnp.float32)

  q, k, v = q_ref[...], k_ref[...], v_ref[...]
  dot = lambda a, b: jax.lax.dot_general(a, b, _NT, preferred_element_type=jnp.float32)
  mm = lambda a, b: jax.lax.dot(a.astype(b.dtype), b, preferred_element_type=jnp.float32)
  s = dot(q, k) * scale
  m_prev = m_ref[...]
  m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))  # (bq, 128), every lane the same
  alpha = jnp.exp(m_prev - m_new)
  p = jnp.exp(s - m_new[:, :1])
  m_ref[...] = m_new
  l_ref[...] = alpha * l_ref[...] + jnp.sum(p, axis=1, keepdims=True)
  acc_o[...] = alpha[:, :1] * acc_o[...] + mm(p, v)
  if with_tangent:
    ds = (dot(dq_ref[...], k) + dot(q, dk_ref[...])) * scale
    pds = p * ds
    s_ref[...] = alpha * s_ref[...] + jnp.sum(pds, axis=1, keepdims=True)
    acc_t[...] = alpha[:, :1] * acc_t[...] + mm(pds, v) + mm(p, dv_ref[...])

  @pl.when(j == pl.num_programs(3) - 1)
  def _finish():
    inv_l = 1.0 / l_ref[...][:, :1]
    o = acc_o[...] * inv_l
    o_ref[...] = o.astype(o_ref.dtype)
    if with_tangent:
      do_ref[...] = (acc_t[...] * inv_l - s_ref[...][:, :1] * inv_l * o).astype(do_ref.dtype)
