"""DiT (Peebles and Xie 2023), the transformer of SiT and MeanFlow: F(x, c_noise, cond) on p x p patches of x.

x [B, H, W, C] -> tokens Conv_p(x) + pos (fixed 2-D sin-cos), conditioning c = emb(c_noise) + emb(label)
(+ emb(t - r) with model.second_time, MeanFlow's two times), then `depth` adaLN-Zero blocks

  (shift_a, scale_a, gate_a, shift_m, scale_m, gate_m) = Dense(SiLU(c)),  mod(h, b, s) = LN(h) (1 + s) + b,
  x <- x + gate_a Attn(mod(x, shift_a, scale_a)),  x <- x + gate_m MLP(mod(x, shift_m, scale_m)),

and the final layer Dense(mod(x, shift, scale)) with (shift, scale) = Dense(SiLU(c)), unpatchified to x's shape. The
modulations and the final Dense start at zero (adaLN-Zero: every block is the identity, the output zero, at init).
LN has no parameters (eps 1e-6), MLP = Dense(GELU_tanh(Dense(h))) of width mlp_ratio * hidden, Attn is multi-head
self-attention through models/attention.py (model.attention_kernel: the flash and forward-mode flash kernels).
Parameter paths: 'patch_embed/kernel', 'time_embed/dense_0/kernel', 'label_embed/embedding', 'block_3/qkv/kernel',
'block_3/modulation/kernel', 'final_modulation/kernel', 'final_linear/kernel'.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cm_jax.models import attention as attention_lib
from cm_jax.models.blocks import remat_block
from cm_jax.models.layers import Conditioned, NoiseLabelEmbedding, check_condition, drop_labels

# The DiT paper's Table 1: model.size -> (depth, hidden, heads).
SIZES = {'S': (12, 384, 6), 'B': (12, 768, 12), 'L': (24, 1024, 16), 'XL': (28, 1152, 16)}
TIME_FEATURES = 256  # sinusoids of c_noise (DiT's frequency_embedding_size)
# FSDP rules for DiT parameters (mesh.rules): the patch embedding [p, p, C, hidden] and the label table
# [classes + 1, hidden] split their hidden axis (C = 4 latent channels does not divide a mesh axis), every other
# kernel its input axis, as the default rule.
MESH_RULES = ((r'patch_embed/kernel$', (None, 'fsdp')), (r'label_embed/embedding$', (None, 'fsdp')),
              (r'kernel$', ('fsdp', None)))


def sincos_2d(features: int, rows: int, cols: int) -> np.ndarray:
  """The fixed positional embedding [rows * cols, features] of the patch at (i, j), row-major:
  [sin(j w), cos(j w), sin(i w), cos(i w)] with w_k = 10000^(-k / (features / 4)), k < features / 4 (DiT, MAE)."""
  if features % 4:
    raise ValueError(f'model.hidden={features}: the 2-D sin-cos embedding needs a multiple of 4.')
  w = 1.0 / 10_000 ** (np.arange(features // 4, dtype=np.float64) / (features // 4))
  i, j = np.meshgrid(np.arange(rows, dtype=np.float64), np.arange(cols, dtype=np.float64), indexing='ij')
  angles = [np.outer(pos.reshape(-1), w) for pos in (j, i)]
  return np.concatenate([f(a) for a in angles for f in (np.sin, np.cos)], axis=-1).astype(np.float32)


def modulate(h, shift, scale):
  """h (1 + scale) + shift, with shift and scale [B, D] broadcast over the tokens of h [B, L, D]."""
  return h * (1 + scale[:, None]) + shift[:, None]


def _norm(dtype):
  return nn.LayerNorm(epsilon=1e-6, use_scale=False, use_bias=False, dtype=dtype)


class DiTBlock(nn.Module):
  """One adaLN-Zero block (module docstring) on tokens x [B, L, hidden] and the conditioning c [B, hidden]."""
  hidden: int
  heads: int
  mlp_ratio: float = 4.0
  attention_kernel: str = 'xla'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, c):
    dense = lambda features, name, init=nn.initializers.xavier_uniform(): nn.Dense(
        features, dtype=self.dtype, kernel_init=init, name=name)
    mod = dense(6 * self.hidden, 'modulation', nn.initializers.zeros)(nn.silu(c))
    shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = jnp.split(mod, 6, axis=-1)
    b, length, _ = x.shape
    qkv = dense(3 * self.hidden, 'qkv')(modulate(_norm(self.dtype)(x), shift_a, scale_a))
    q, k, v = (t.reshape(b, length, self.heads, self.hidden // self.heads) for t in jnp.split(qkv, 3, axis=-1))
    a = attention_lib.attention(q, k, v, kernel=self.attention_kernel).reshape(b, length, self.hidden)
    x = x + gate_a[:, None] * dense(self.hidden, 'proj')(a)
    h = dense(int(self.hidden * self.mlp_ratio), 'mlp_0')(modulate(_norm(self.dtype)(x), shift_m, scale_m))
    h = dense(self.hidden, 'mlp_1')(nn.gelu(h, approximate=True))
    return x + gate_m[:, None] * h


class DiT(Conditioned):
  """DiT / SiT: F(x, c_noise, cond) with the shape of x (module docstring).

  Attributes:
    size: 'S', 'B', 'L' or 'XL' (depth, hidden, heads of the DiT paper, SIZES); '' takes depth, hidden, heads.
    patch_size: p of the p x p patches (DiT-XL/2: 2); it must divide the input's height and width.
    depth, hidden, heads: blocks, token width and attention heads; nonzero values replace the size's.
    mlp_ratio: MLP width / hidden.
    num_classes: number of class labels; 0 for an unconditional model. The label table has a learned null class
      (row num_classes) that a label < 0 embeds as: the unconditional branch of classifier-free guidance.
    label_dropout: probability of replacing a training label by the null class (DiT / MeanFlow: 0.1).
    guidance_embedding: a guidance-scale input s, embedded like c_noise (layers.NoiseLabelEmbedding).
    time_embedding: 'positional' (DiT) or 'fourier' embedding of c_noise, TIME_FEATURES sinusoids.
    time_scale: positional multiplier of c_noise (DiT's 1000 timesteps: 1000 t; SiT and MeanFlow embed t itself: 1),
      or Fourier frequency std.
    second_time, interval_init: the second time input t - r (MeanFlow's: a second timestep MLP of TIME_FEATURES
      sinusoids, added to c) and its embedding's initialisation (layers.Conditioned).
    dtype: compute dtype ('float32' or 'bfloat16'); parameters stay float32, the output is float32.
    remat: rematerialisation of the blocks in the backward pass: '', 'block' or a jax.checkpoint_policies name
      (blocks.remat_block).
    attention_kernel: 'xla' or 'flash' (Pallas flash attention on TPU, with a forward-mode kernel for JVPs),
      models/attention.py.
  """
  size: str = 'B'
  patch_size: int = 2
  depth: int = 0
  hidden: int = 0
  heads: int = 0
  mlp_ratio: float = 4.0
  time_scale: float = 1000.0  # the conditioning fields are layers.Conditioned's
  dtype: str = 'float32'
  remat: str = ''
  attention_kernel: str = 'xla'

  def dims(self) -> tuple[int, int, int]:
    """(depth, hidden, heads): the size's, with the nonzero fields in their place."""
    if self.size and self.size not in SIZES:
      raise ValueError(f'model.size={self.size!r}; expected one of {sorted(SIZES)} or \'\' (depth, hidden, heads).')
    named = SIZES.get(self.size, (0, 0, 0))
    depth, hidden, heads = (mine or theirs for mine, theirs in zip((self.depth, self.hidden, self.heads), named))
    if not (depth > 0 and hidden > 0 and heads > 0) or hidden % heads:
      raise ValueError(f'model.size={self.size!r} with depth={self.depth}, hidden={self.hidden}, heads={self.heads} '
                       f'gives (depth, hidden, heads) = {(depth, hidden, heads)}: each must be positive and heads '
                       'must divide hidden.')
    return depth, hidden, heads

  @nn.compact
  def __call__(self, x, c_noise, cond=None, train=False, guidance=None, interval=None):
    """Maps x [B, H, W, C], c_noise [B], cond [B] int (< 0: no label) or None, guidance [B] or None (s = 1) and
    interval [B] or None (the second time t - r, model.second_time; None: 0) to [B, H, W, C] (float32)."""
    depth, hidden, heads = self.dims()
    p = self.patch_size
    b, height, width, channels = x.shape
    if p < 1 or height % p or width % p:
      raise ValueError(f'model.patch_size={p} does not divide the input\'s {height}x{width} positions; choose a '
                       'divisor of both.')
    check_condition(self.num_classes, self.guidance_embedding, cond, guidance)
    dtype = jnp.dtype(self.dtype)
    c = NoiseLabelEmbedding(features=hidden, kind=self.time_embedding, scale=self.time_scale,
                            guidance=self.guidance_embedding, noise_features=TIME_FEATURES, dtype=dtype,
                            name='time_embed')(c_noise, guidance=guidance)
    c = c + self.interval_embedding(interval, c_noise, hidden, TIME_FEATURES, dtype)
    if self.num_classes:
      cond = drop_labels(self, cond, self.label_dropout, train)
      table = nn.Embed(self.num_classes + 1, hidden, embedding_init=nn.initializers.normal(0.02), dtype=dtype,
                       name='label_embed')
      c = c + table(jnp.where(cond < 0, self.num_classes, cond))  # "no label": the learned null class

    rows, cols = height // p, width // p
    patch_init = nn.initializers.xavier_uniform(in_axis=(0, 1, 2), out_axis=-1)  # DiT's: of the [p p C, hidden] map
    tokens = nn.Conv(hidden, (p, p), strides=(p, p), padding='VALID', dtype=dtype, kernel_init=patch_init,
                     name='patch_embed')(x.astype(dtype))
    h = tokens.reshape(b, rows * cols, hidden) + jnp.asarray(sincos_2d(hidden, rows, cols), dtype)
    block = remat_block(self.remat, DiTBlock, static_argnums=())
    for i in range(depth):
      h = block(hidden, heads, self.mlp_ratio, self.attention_kernel, dtype, name=f'block_{i}')(h, c)

    shift, scale = jnp.split(nn.Dense(2 * hidden, dtype=dtype, kernel_init=nn.initializers.zeros,
                                      name='final_modulation')(nn.silu(c)), 2, axis=-1)
    out = nn.Dense(p * p * channels, dtype=dtype, kernel_init=nn.initializers.zeros,
                   name='final_linear')(modulate(_norm(dtype)(h), shift, scale))
    out = out.reshape(b, rows, cols, p, p, channels).transpose(0, 1, 3, 2, 4, 5).reshape(b, height, width, channels)
    return out.astype(jnp.promote_types(dtype, jnp.float32))  # bfloat16 compute gives float32; float64 stays
