"""Building blocks shared by the paper networks (DDPM++/NCSN++ in ncsnpp.py, ADM in adm.py), after EDM's UNets.

Parameter paths are regular: `enc_16x16/block_0/conv_0/kernel`, `dec_8x8/in_0/qkv/kernel`, `embed/dense_0/kernel`.
"""

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cm_jax.models import attention as attention_lib
from cm_jax.models.layers import adaptive_norm, feature_norm


def resample(x, mode, fir):
  """BigGAN-style 2x 'up' or 'down' resampling of x [B, H, W, C] with the separable FIR filter `fir`.

  fir = (1, 1) is nearest-neighbour up / 2x2 average-pool down; (1, 3, 3, 1) is the NCSN++ filter.
  """
  taps = np.asarray(fir, np.float32)
  kernel = np.outer(taps, taps) / np.sum(taps) ** 2
  channels, size = x.shape[-1], len(fir)
  kernel = jnp.asarray(np.tile(kernel[:, :, None, None], (1, 1, 1, channels)), x.dtype)
  pad = (size - 1) // 2
  kwargs = dict(dimension_numbers=('NHWC', 'HWIO', 'NHWC'), feature_group_count=channels)
  if mode == 'down':
    return jax.lax.conv_general_dilated(x, kernel, (2, 2), [(pad, pad)] * 2, **kwargs)
  if mode == 'up':
    pad = size - 1 - pad
    return jax.lax.conv_general_dilated(x, 4 * kernel, (1, 1), [(pad, pad)] * 2, lhs_dilation=(2, 2), **kwargs)
  raise ValueError(f"resample mode {mode!r}; expected 'up' or 'down'.")


class UNetBlock(nn.Module):
  """Residual block with optional up/down resampling and self-attention (EDM's UNetBlock).

  h = Conv(Dropout(SiLU(adaptive(Conv(SiLU(GN(x))))))),  x <- (h + skip(x)) * skip_scale, then
  x <- (x + Proj(Attn(GN(x)))) * skip_scale. adaptive_norm: 'shift' GN(h + b(t)) (DDPM++), 'scale_shift'
  GN(h) (1 + s(t)) + b(t) (ADM), 'double' GN(h) pnorm(s(t)) + pnorm(b(t)) (sCM's adaptive double normalisation).
  GN: layers.feature_norm of kind `norm` ('group': GroupNorm with min(32, C / 4) groups as in EDM, 'nsln').
  """
  features: int
  up: bool = False
  down: bool = False
  attention: bool = False
  head_dim: int = 0  # channels per attention head (at least one head); 0: one head
  attention_kernel: str = 'xla'  # models/attention.py: 'xla' or 'flash'
  dropout: float = 0.0
  skip_scale: float = 1.0
  adaptive_norm: str = 'scale_shift'
  resample_filter: Sequence[int] = (1, 1)
  resample_proj: bool = False  # a 1x1 conv on a resampled skip even when the width does not change
  eps: float = 1e-5
  dtype: Any = jnp.float32
  norm: str = 'group'

  @nn.compact
  def __call__(self, x, emb, train):
    """Maps x [B, H, W, C_in] and emb [B, E] to [B, H', W', features]."""
    mode = 'up' if self.up else 'down' if self.down else None
    conv = lambda size, name, **kw: nn.Conv(self.features, (size, size), dtype=self.dtype, name=name, **kw)
    h = nn.silu(feature_norm(self.norm, x.shape[-1], self.eps, self.dtype, 'norm_0')(x))
    if mode:
      h = resample(h, mode, self.resample_filter)
    h = conv(3, 'conv_0')(h)
    h = adaptive_norm(self.adaptive_norm, feature_norm(self.norm, self.features, self.eps, self.dtype, 'norm_1'), h,
                      emb, self.dtype)
    h = nn.Dropout(self.dropout, deterministic=not train)(nn.silu(h))
    h = conv(3, 'conv_1', kernel_init=nn.initializers.zeros)(h)

    skip = x
    if mode:
      skip = resample(skip, mode, self.resample_filter)
    if self.features != x.shape[-1] or (mode and self.resample_proj):
      skip = conv(1, 'skip')(skip)
    x = (h + skip) * self.skip_scale
    if self.attention:
      x = (x + self._attention(x)) * self.skip_scale
    return x

  def _attention(self, x):
    """Proj(softmax(q k^T / sqrt(d)) v) of GN(x) over the H*W positions, by the kernel attention_kernel names
    (models/attention.py)."""
    b, hgt, wid, c = x.shape
    heads = max(1, c // self.head_dim) if self.head_dim else 1
    h = feature_norm(self.norm, c, self.eps, self.dtype, 'norm_2')(x).reshape(b, hgt * wid, c)
    q, k, v = jnp.split(nn.Dense(3 * c, dtype=self.dtype, name='qkv')(h), 3, axis=-1)
    h = attention_lib.attention(*(t.reshape(b, hgt * wid, heads, c // heads) for t in (q, k, v)),
                                kernel=self.attention_kernel)
    return nn.Dense(c, dtype=self.dtype, kernel_init=nn.initializers.zeros, name='proj')(h.reshape(b, hgt, wid, c))


def remat_block(policy: str, block: type[nn.Module] = UNetBlock, static_argnums: tuple = (3,)):
  """`block`, or `block` recomputed in the backward pass instead of storing its activations: policy 'block'
  recomputes everything, the name of a jax.checkpoint_policies policy (e.g. 'dots_with_no_batch_dims_saveable')
  keeps what it names; '' is no rematerialisation. static_argnums: the call's Python arguments (UNetBlock's
  (self, x, emb, train): train)."""
  if not policy:
    return block
  if policy != 'block' and not hasattr(jax.checkpoint_policies, policy):
    raise ValueError(f"model.remat={policy!r}; expected '', 'block' or a jax.checkpoint_policies name such as "
                     "'dots_with_no_batch_dims_saveable'.")
  return nn.remat(block, static_argnums=static_argnums,
                  policy=None if policy == 'block' else getattr(jax.checkpoint_policies, policy))


class EncoderLevel(nn.Module):
  """One encoder resolution: an input conv of width `stem` (first level) or a down block, then residual blocks.

  With `residual_input` (NCSN++'s progressive input), the image pyramid `aux` is downsampled by a strided conv
  and merged: x <- (x + aux_residual(aux)) / sqrt(2), aux <- x.
  """
  features: int
  num_blocks: int
  attention: bool
  stem: int  # width of the first level's input conv; 0 on later levels
  block: Callable[..., nn.Module]  # partial(UNetBlock, ...) with the network's settings
  residual_input: bool = False
  resample_filter: Sequence[int] = (1, 1)
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, aux, emb, train):
    """Returns (x, aux, skips): the level's output, the image pyramid and the activations the decoder reuses."""
    if self.stem:
      x = nn.Conv(self.stem, (3, 3), dtype=self.dtype, name='conv')(x)
    else:
      x = self.block(x.shape[-1], down=True, name='down')(x, emb, train)
      if self.residual_input:
        aux = nn.Conv(x.shape[-1], (3, 3), dtype=self.dtype, name='aux_residual')(
            resample(aux, 'down', self.resample_filter))
        x = aux = (x + aux) / np.sqrt(2)
    skips = [x]
    for i in range(self.num_blocks):
      x = self.block(self.features, attention=self.attention, name=f'block_{i}')(x, emb, train)
      skips.append(x)
    return x, aux, skips


class DecoderLevel(nn.Module):
  """One decoder resolution: two bottleneck blocks (lowest level, the first with attention) or an up block,
  then num_blocks + 1 residual blocks on [x, skip] concatenations; blocks in `attention_blocks` attend."""
  features: int
  num_blocks: int
  attention_blocks: Sequence[int]
  bottom: bool
  block: Callable[..., nn.Module]

  @nn.compact
  def __call__(self, x, skips, emb, train):
    """Consumes the encoder's skips of this level, latest first."""
    if self.bottom:
      x = self.block(x.shape[-1], attention=True, name='in_0')(x, emb, train)
      x = self.block(x.shape[-1], name='in_1')(x, emb, train)
    else:
      x = self.block(x.shape[-1], up=True, name='up')(x, emb, train)
    for i, skip in enumerate(reversed(skips)):
      x = jnp.concatenate([x, skip], axis=-1)
      x = self.block(self.features, attention=i in self.attention_blocks, name=f'block_{i}')(x, emb, train)
    return x


def unet(x, c_noise, cond, train, guidance, *, net, block, embed, attention_blocks, residual_input=False,
         resample_filter=(1, 1), eps=1e-5):
  """The encoder-decoder of EDM's UNets on the fields of `net` (an NCSNpp or ADM module, inside its compact call).

  block: partial(UNetBlock, ...); embed: the NoiseLabelEmbedding (SiLU applied here); guidance: [B] or None;
  attention_blocks(res) -> decoder block indices with attention at resolution res. Returns F [B, H, W, C] in float32
  (float64 when net.dtype is).
  """
  levels = len(net.channel_mult)
  if x.shape[1] % 2 ** (levels - 1) or x.shape[2] % 2 ** (levels - 1):
    raise ValueError(f'Spatial size {x.shape[1:3]} is not divisible by 2^{levels - 1} for channel_mult '
                     f'{net.channel_mult}.')
  dtype = jnp.dtype(net.dtype)
  emb = nn.silu(embed(c_noise, cond, train, guidance))
  h, aux, skips = x.astype(dtype), x.astype(dtype), []
  for level, mult in enumerate(net.channel_mult):
    res = x.shape[1] >> level
    h, aux, level_skips = EncoderLevel(
        net.channels * mult, net.num_res_blocks, res in net.attn_resolutions, stem=net.channels if level == 0 else 0, block=block,
        residual_input=residual_input, resample_filter=resample_filter, dtype=dtype,
        name=f'enc_{res}x{res}')(h, aux, emb, train)
    skips.append(level_skips)
  for level, mult in reversed(list(enumerate(net.channel_mult))):
    res = x.shape[1] >> level
    h = DecoderLevel(net.channels * mult, net.num_res_blocks, tuple(attention_blocks(res)),
                     bottom=level == levels - 1, block=block, name=f'dec_{res}x{res}')(h, skips.pop(), emb, train)
  h = nn.silu(feature_norm(net.norm, h.shape[-1], eps, dtype, 'out_norm')(h))
  out = nn.Conv(x.shape[-1], (3, 3), dtype=dtype, kernel_init=nn.initializers.zeros, name='out_conv')(h)
  return out.astype(jnp.promote_types(dtype, jnp.float32))  # bfloat16 compute gives float32; float64 stays
