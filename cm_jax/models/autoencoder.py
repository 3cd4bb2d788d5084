"""A KL autoencoder (Rombach et al. 2022) in the module layout of diffusers' `AutoencoderKL`, so that a Stable-Diffusion
VAE's weights load by renaming alone (latents.py) and a cm_jax-trained one exports to that format.

Parameter paths mirror diffusers' state-dict keys with '.' -> '/' and 'name.i' -> 'name_i':
`encoder/down_blocks_0/resnets_1/conv2/kernel` is `encoder.down_blocks.0.resnets.1.conv2.weight`.

  encoder: conv_in, down_blocks_i (resnets_j, downsamplers_0/conv: stride 2 after zero-padding bottom/right),
           mid_block (resnets_0, attentions_0, resnets_1), conv_norm_out, SiLU, conv_out -> 2 latent_channels
  quant_conv (1x1) -> (mean, log-variance), log-variance clipped to [-30, 20]
  post_quant_conv (1x1), decoder: conv_in, mid_block, up_blocks_i (layers_per_block + 1 resnets, upsamplers_0/conv:
           nearest 2x then 3x3), conv_norm_out, SiLU, conv_out
ResnetBlock2D: x' = skip(x) + conv2(SiLU(GN(conv1(SiLU(GN(x)))))), skip a 1x1 conv_shortcut when widths differ.
Attention (one head over the H W positions): x' = x + to_out_0(softmax(q k^T / sqrt(C)) v), q, k, v = to_q/k/v(GN(x)).
"""

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

EPS = 1e-6  # every GroupNorm of the diffusers VAE


def _norm(groups, name):
  return nn.GroupNorm(num_groups=groups, epsilon=EPS, use_fast_variance=False, name=name)


class ResnetBlock2D(nn.Module):
  """x' = skip(x) + conv2(SiLU(norm2(conv1(SiLU(norm1(x)))))), skip = conv_shortcut (1x1) when widths differ."""
  features: int
  groups: int

  @nn.compact
  def __call__(self, x):
    h = nn.Conv(self.features, (3, 3), name='conv1')(nn.silu(_norm(self.groups, 'norm1')(x)))
    h = nn.Conv(self.features, (3, 3), name='conv2')(nn.silu(_norm(self.groups, 'norm2')(h)))
    if x.shape[-1] != self.features:
      x = nn.Conv(self.features, (1, 1), name='conv_shortcut')(x)
    return x + h


class Attention(nn.Module):
  """x' = x + to_out_0(softmax(q k^T / sqrt(C)) v) with q, k, v = to_q, to_k, to_v of group_norm(x) (one head)."""
  groups: int

  @nn.compact
  def __call__(self, x):
    b, hgt, wid, c = x.shape
    h = _norm(self.groups, 'group_norm')(x).reshape(b, hgt * wid, c)
    q, k, v = (nn.Dense(c, name=n)(h)[:, :, None] for n in ('to_q', 'to_k', 'to_v'))  # [B, HW, 1 head, C]
    attended = jax.nn.dot_product_attention(q, k, v)  # cuDNN's fused kernel where it applies; XLA otherwise
    return x + nn.Dense(c, name='to_out_0')(attended.reshape(b, hgt * wid, c)).reshape(b, hgt, wid, c)


class MidBlock(nn.Module):
  """resnets_0 -> attentions_0 (optional) -> resnets_1 at the lowest resolution."""
  groups: int
  attention: bool = True

  @nn.compact
  def __call__(self, x):
    x = ResnetBlock2D(x.shape[-1], self.groups, name='resnets_0')(x)
    if self.attention:
      x = Attention(self.groups, name='attentions_0')(x)
    return ResnetBlock2D(x.shape[-1], self.groups, name='resnets_1')(x)


class Resample(nn.Module):
  """'down': zero-pad bottom/right by one, 3x3 conv of stride 2; 'up': nearest-neighbour 2x, then a 3x3 conv."""
  mode: str

  @nn.compact
  def __call__(self, x):
    b, hgt, wid, c = x.shape
    if self.mode == 'down':
      x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
      return nn.Conv(c, (3, 3), strides=(2, 2), padding='VALID', name='conv')(x)
    x = jax.image.resize(x, (b, 2 * hgt, 2 * wid, c), method='nearest')
    return nn.Conv(c, (3, 3), name='conv')(x)


class Block(nn.Module):
  """A down_blocks_i / up_blocks_i entry: `num_layers` resnets, then downsamplers_0 / upsamplers_0 unless last."""
  features: int
  num_layers: int
  groups: int
  resample: str = ''  # 'down', 'up' or '' (none)

  @nn.compact
  def __call__(self, x):
    for j in range(self.num_layers):
      x = ResnetBlock2D(self.features, self.groups, name=f'resnets_{j}')(x)
    if self.resample:
      x = Resample(self.resample, name=f'{self.resample}samplers_0')(x)
    return x


class Encoder(nn.Module):
  """Images [B, H, W, C] -> moments [B, H / f, W / f, 2 latent_channels], f = 2^(levels - 1)."""
  block_out_channels: Sequence[int]
  layers_per_block: int
  groups: int
  latent_channels: int
  mid_attention: bool

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(self.block_out_channels[0], (3, 3), name='conv_in')(x)
    last = len(self.block_out_channels) - 1
    for i, features in enumerate(self.block_out_channels):
      x = Block(features, self.layers_per_block, self.groups, '' if i == last else 'down', name=f'down_blocks_{i}')(x)
    x = MidBlock(self.groups, self.mid_attention, name='mid_block')(x)
    x = nn.silu(_norm(self.groups, 'conv_norm_out')(x))
    return nn.Conv(2 * self.latent_channels, (3, 3), name='conv_out')(x)


class Decoder(nn.Module):
  """Latents [B, h, w, latent_channels] -> images [B, h f, w f, out_channels]."""
  block_out_channels: Sequence[int]
  layers_per_block: int
  groups: int
  out_channels: int
  mid_attention: bool

  @nn.compact
  def __call__(self, z):
    widths = tuple(reversed(self.block_out_channels))
    x = nn.Conv(widths[0], (3, 3), name='conv_in')(z)
    x = MidBlock(self.groups, self.mid_attention, name='mid_block')(x)
    last = len(widths) - 1
    for i, features in enumerate(widths):
      x = Block(features, self.layers_per_block + 1, self.groups, '' if i == last else 'up', name=f'up_blocks_{i}')(x)
    x = nn.silu(_norm(self.groups, 'conv_norm_out')(x))
    return nn.Conv(self.out_channels, (3, 3), name='conv_out')(x)


class AutoencoderKL(nn.Module):
  """The KL autoencoder: `encode(x) -> (mean, logvar)`, `decode(z) -> x`; `__call__` reconstructs from the mean.

  Attributes (diffusers' config.json names): in_channels (= out_channels), block_out_channels (one per level),
  layers_per_block, latent_channels, norm_num_groups, mid_block_add_attention, use_quant_conv, use_post_quant_conv.
  """
  in_channels: int = 3
  block_out_channels: Sequence[int] = (128, 256, 512, 512)
  layers_per_block: int = 2
  latent_channels: int = 4
  norm_num_groups: int = 32
  mid_block_add_attention: bool = True
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True

  def setup(self):
    widths = tuple(self.block_out_channels)
    self.encoder = Encoder(widths, self.layers_per_block, self.norm_num_groups, self.latent_channels,
                           self.mid_block_add_attention)
    self.decoder = Decoder(widths, self.layers_per_block, self.norm_num_groups, self.in_channels,
                           self.mid_block_add_attention)
    if self.use_quant_conv:
      self.quant_conv = nn.Conv(2 * self.latent_channels, (1, 1))
    if self.use_post_quant_conv:
      self.post_quant_conv = nn.Conv(self.latent_channels, (1, 1))

  @property
  def downsampling(self) -> int:
    """The spatial factor f between images and latents."""
    return 2 ** (len(self.block_out_channels) - 1)

  def latent_shape(self, image_shape) -> tuple:
    """(H / f, W / f, latent_channels) of images (H, W, in_channels); an error when they do not fit."""
    h, w, c = image_shape
    f = self.downsampling
    if c != self.in_channels or h % f or w % f:
      raise ValueError(f'The autoencoder takes images with {self.in_channels} channels and sides divisible by {f}; '
                       f'the data has shape {tuple(image_shape)}.')
    return (h // f, w // f, self.latent_channels)

  def encode(self, x):
    """(mean, logvar) of the diagonal Gaussian posterior q(z | x), x [B, H, W, C] in [-1, 1]."""
    moments = self.encoder(x)
    if self.use_quant_conv:
      moments = self.quant_conv(moments)
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return mean, jnp.clip(logvar, -30.0, 20.0)

  def decode(self, z):
    """Images from (unscaled) latents z."""
    if self.use_post_quant_conv:
      z = self.post_quant_conv(z)
    return self.decoder(z)

  def __call__(self, x, c_noise=None, cond=None, train=False):
    """decode(mean(x)): the reconstruction (the trainer's generic call; c_noise, cond and train are not used)."""
    del c_noise, cond, train
    return self.decode(self.encode(x)[0])
