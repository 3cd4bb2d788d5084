"""A DDPM++/ADM-style UNet for images [B, H, W, C]."""

import functools
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cm_jax.models.layers import NoiseLabelEmbedding, adaptive_norm, feature_norm


class ResBlock(nn.Module):
  """Residual block with adaptive normalisation: (skip(x) + F(x, emb)) / sqrt(2).

  F = Conv(Dropout(SiLU(ada(h, SiLU(emb))))),  h = Conv(SiLU(N(x))),  ada: layers.adaptive_norm with N
  ('shift' N(h + b), 'scale_shift' N(h) (1 + s) + b, 'double' N(h) pnorm(s) + pnorm(b)); N: layers.feature_norm.
  """
  features: int
  dropout: float = 0.0
  adaptive_norm: str = 'scale_shift'
  norm: str = 'group'

  @nn.compact
  def __call__(self, x, emb, train):
    """Maps x [B, H, W, C_in] and emb [B, E] to [B, H, W, features]."""
    h = nn.silu(feature_norm(self.norm, x.shape[-1], name='norm_0')(x))
    h = nn.Conv(self.features, (3, 3), name='conv_0')(h)
    h = adaptive_norm(self.adaptive_norm, feature_norm(self.norm, self.features, name='norm_1'), h, nn.silu(emb))
    h = nn.Dropout(self.dropout, deterministic=not train)(nn.silu(h))
    h = nn.Conv(self.features, (3, 3), name='conv_1')(h)
    if x.shape[-1] != self.features:
      x = nn.Conv(self.features, (1, 1), name='skip')(x)
    return (x + h) / np.sqrt(2)


class SelfAttention(nn.Module):
  """Multi-head self-attention over pixels: (x + Proj(Attn(N(x)))) / sqrt(2)."""
  head_dim: int = 64
  norm: str = 'group'

  @nn.compact
  def __call__(self, x):
    """softmax(q k^T / sqrt(d)) v over the H*W positions of x [B, H, W, C]."""
    b, hgt, wid, c = x.shape
    heads = max(1, c // self.head_dim)
    h = feature_norm(self.norm, c, name='norm')(x).reshape(b, hgt * wid, c)
    q, k, v = jnp.split(nn.Dense(3 * c, name='qkv')(h), 3, axis=-1)
    q, k, v = (t.reshape(b, hgt * wid, heads, c // heads) for t in (q, k, v))
    logits = jnp.einsum('bqhd,bkhd->bhqk', q, k) / np.sqrt(c // heads)
    h = jnp.einsum('bhqk,bkhd->bqhd', jax.nn.softmax(logits, axis=-1), v)
    h = nn.Dense(c, name='proj')(h.reshape(b, hgt, wid, c))
    return (x + h) / np.sqrt(2)


class DownLevel(nn.Module):
  """One encoder resolution: residual (+attention) blocks, then downsampling."""
  features: int
  num_res_blocks: int
  attention: bool
  downsample: bool
  block: Callable[..., nn.Module]  # partial(ResBlock, ...) with the network's settings
  attend: Callable[..., nn.Module]  # partial(SelfAttention, ...)

  @nn.compact
  def __call__(self, h, emb, train):
    """Returns the level's output and the activations its decoder twin reuses."""
    skips = []
    for i in range(self.num_res_blocks):
      h = self.block(self.features, name=f'res_{i}')(h, emb, train)
      if self.attention:
        h = self.attend(name=f'attn_{i}')(h)
      skips.append(h)
    if self.downsample:
      h = nn.Conv(self.features, (3, 3), strides=(2, 2), name='downsample')(h)
      skips.append(h)
    return h, skips


class UpLevel(nn.Module):
  """One decoder resolution: residual (+attention) blocks, then upsampling.

  Each residual block sees [h, skip] concatenated along channels; upsampling is
  nearest-neighbour followed by a 3x3 conv.
  """
  features: int
  attention: bool
  upsample: bool
  block: Callable[..., nn.Module]
  attend: Callable[..., nn.Module]

  @nn.compact
  def __call__(self, h, skips, emb, train):
    """Concatenates the encoder's skips, latest first, one per residual block."""
    for i, skip in enumerate(reversed(skips)):
      h = jnp.concatenate([h, skip], axis=-1)
      h = self.block(self.features, name=f'res_{i}')(h, emb, train)
      if self.attention:
        h = self.attend(name=f'attn_{i}')(h)
    if self.upsample:
      b, hgt, wid, c = h.shape
      h = jax.image.resize(h, (b, 2 * hgt, 2 * wid, c), method='nearest')
      h = nn.Conv(self.features, (3, 3), name='upsample')(h)
    return h


class MidBlock(nn.Module):
  """Bottleneck: residual block, self-attention, residual block."""
  features: int
  block: Callable[..., nn.Module]
  attend: Callable[..., nn.Module]

  @nn.compact
  def __call__(self, h, emb, train):
    """res_0 -> attn -> res_1 at the lowest resolution."""
    h = self.block(self.features, name='res_0')(h, emb, train)
    h = self.attend(name='attn')(h)
    return self.block(self.features, name='res_1')(h, emb, train)


class UNet(nn.Module):
  """Noise-conditional UNet: F(x, c_noise, cond) with the shape of x.

  Attributes:
    channels: base width; level i has channels * channel_mult[i] channels.
    channel_mult: width multiplier per resolution level (one level each).
    num_res_blocks: residual blocks per encoder level (decoder has one more).
    attn_resolutions: spatial sizes (e.g. 16 for 16x16) with self-attention.
    dropout: dropout rate inside the residual blocks.
    num_classes: number of class labels; 0 for an unconditional model.
    label_dropout: probability of dropping a training label, so the network also learns the unconditional
      F(x, c_noise, -1) that classifier-free guidance needs (a label < 0 is "no label").
    guidance_embedding: a guidance-scale input s, embedded like c_noise (sCD / LCM students of a guided teacher).
    time_embedding: 'fourier' or 'positional' embedding of c_noise.
    time_scale: Fourier frequency std, or positional multiplier of c_noise.
    adaptive_norm: 'scale_shift' (GN(h) (1 + s(t)) + b(t)), 'shift' (GN(h + b(t))) or 'double'
      (GN(h) pnorm(s(t)) + pnorm(b(t)), sCM).
    norm: 'group' (GroupNorm) or 'nsln' (non-scaling LayerNorm, improved latent CT); layers.feature_norm.
  """
  channels: int = 64
  channel_mult: Sequence[int] = (1, 2, 2)
  num_res_blocks: int = 2
  attn_resolutions: Sequence[int] = (16,)
  dropout: float = 0.0
  num_classes: int = 0
  label_dropout: float = 0.0
  guidance_embedding: bool = False
  time_embedding: str = 'positional'
  time_scale: float = 1000.0
  adaptive_norm: str = 'scale_shift'
  norm: str = 'group'

  @nn.compact
  def __call__(self, x, c_noise, cond=None, train=False, guidance=None):
    """Maps x [B, H, W, C], c_noise [B], cond [B] int (< 0: no label) or None, guidance [B] or None (s = 1) to
    [B, H, W, C]."""
    levels = len(self.channel_mult)
    if x.shape[1] % 2 ** (levels - 1) or x.shape[2] % 2 ** (levels - 1):
      raise ValueError(f'Spatial size {x.shape[1:3]} is not divisible by '
                       f'2^{levels - 1} for channel_mult {self.channel_mult}.')
    emb = NoiseLabelEmbedding(
        features=4 * self.channels, kind=self.time_embedding, scale=self.time_scale, num_classes=self.num_classes,
        label_dropout=self.label_dropout, guidance=self.guidance_embedding,
        name='time_embed')(c_noise, cond, train, guidance)
    blocks = dict(block=functools.partial(ResBlock, dropout=self.dropout, adaptive_norm=self.adaptive_norm,
                                          norm=self.norm),
                  attend=functools.partial(SelfAttention, norm=self.norm))

    h = nn.Conv(self.channels, (3, 3), name='conv_in')(x)
    skips = [h]
    for i, mult in enumerate(self.channel_mult):
      h, level_skips = DownLevel(
          self.channels * mult, self.num_res_blocks,
          attention=h.shape[1] in self.attn_resolutions,
          downsample=i < levels - 1, **blocks, name=f'down_{i}')(h, emb, train)
      skips += level_skips

    h = MidBlock(h.shape[-1], **blocks, name='mid')(h, emb, train)

    for i, mult in reversed(list(enumerate(self.channel_mult))):
      skips, level_skips = (skips[:-self.num_res_blocks - 1],
                            skips[-self.num_res_blocks - 1:])
      h = UpLevel(
          self.channels * mult,
          attention=h.shape[1] in self.attn_resolutions,
          upsample=i > 0, **blocks, name=f'up_{i}')(h, tuple(level_skips), emb, train)

    h = nn.silu(feature_norm(self.norm, h.shape[-1], name='norm_out')(h))
    return nn.Conv(x.shape[-1], (3, 3), kernel_init=nn.initializers.zeros,
                   name='conv_out')(h)
