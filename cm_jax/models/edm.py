"""EDM's networks (Karras et al. 2022, NVlabs/edm `training/networks.py`) as module trees named like EDM's state
dicts, so that its released pickles load by name: `NCSNpp(layout='edm')` is EDM's SongUNet (DDPM++ / NCSN++) and
`ADM(layout='edm')` its DhariwalUNet.

The Flax path of every tensor is its EDM state-dict name with '.' -> '/' (models.checkpoints; formats/diffusers.py
converts the layouts): 'model.enc.16x16_block0.conv0.weight' -> 'enc/16x16_block0/conv0/kernel'. Where EDM differs
from cm_jax's own layout (models/blocks.py) this follows EDM:
  * SongUNet's mapping: class labels (one-hot times sqrt(label_dim), through a biased dense layer) and augmentation
    labels join the noise sinusoids before map_layer0; the positional frequencies are (1/10000)^(i / (half - 1))
    (EDM's endpoint=True); the sinusoids are ordered [sin, cos]; the Fourier frequencies are EDM's own (a parameter
    'map_noise/freqs' read from the file, never trained: it passes through stop_gradient).
  * DhariwalUNet's mapping: augmentation labels before map_layer0, class labels after map_layer1 (no bias);
    [cos, sin] of (1/10000)^(i / half).
  * NCSN++'s residual encoder convolves the image pyramid at full resolution, then filters and subsamples (EDM's
    fused_resample); decoder_type 'skip' is the progressive output (aux_up / aux_norm / aux_conv at every level).
  * The attention's qkv channels are ordered (head, channel, q|k|v), as EDM's reshape reads them; a block at a width
    below channels_per_head has no attention (EDM's num_heads = 0); DhariwalUNet's first conv has channels *
    channel_mult[0] outputs.
With model.second_time, SongUNet is the MeanFlow PyTorch port's (Gsunshine/py-meanflow models/unet.py, the CIFAR-10
network of MeanFlow, Geng et al. 2025): the second time h = t - r goes through the same map_noise as c_noise = t
(the same sinusoids, swap and Fourier frequencies, no scale of its own), and [map_noise(t), map_noise(h)] is the
input of map_layer0 (and the width of map_augment's output); its attention splits the qkv channels as
(q|k|v, head, channel) (its QKVAttention, guided-diffusion's order). The port adds no tensor, so its state dicts keep
EDM's names ('net.map_layer0.weight' is [E, 2 * noise features]). The port has no class labels; here map_label takes
the same doubled width. A one-time SongUNet is this network with map_layer0's rows of h zero (how
interval_init='zeros' starts them) and its qkv channels reordered.
"""

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cm_jax.models import attention as attention_lib
from cm_jax.models.blocks import resample
from cm_jax.models.layers import adaptive_norm, check_condition, drop_labels, feature_norm

DECODER_TYPES = ('standard', 'skip')  # SongUNet's decoder_type


class Block(nn.Module):
  """EDM's UNetBlock, its children named as EDM's (norm0, conv0, affine, norm1, conv1, skip, norm2, qkv, proj):

  h = conv1(dropout(SiLU(adaptive(conv0(resample(SiLU(norm0(x)))))))),  x <- (h + skip(x)) * skip_scale, then
  x <- (x + proj(attention(norm2(x)))) * skip_scale with `heads` heads (0: no attention), the qkv channels ordered
  (head, channel, q|k|v) as EDM's reshape reads them, or with chunked_qkv (q|k|v, head, channel) as the MeanFlow
  port's QKVAttention splits them.
  """
  features: int
  up: bool = False
  down: bool = False
  heads: int = 0
  dropout: float = 0.0
  skip_scale: float = 1.0
  eps: float = 1e-5
  resample_filter: Sequence[int] = (1, 1)
  resample_proj: bool = False
  adaptive_norm: str = 'scale_shift'
  attention_kernel: str = 'xla'
  dtype: Any = jnp.float32
  norm: str = 'group'
  chunked_qkv: bool = False

  @nn.compact
  def __call__(self, x, emb, train):
    """Maps x [B, H, W, C_in] and emb [B, E] to [B, H', W', features]."""
    mode = 'up' if self.up else 'down' if self.down else None
    conv = lambda size, name, **kw: nn.Conv(self.features, (size, size), dtype=self.dtype, name=name, **kw)
    h = nn.silu(feature_norm(self.norm, x.shape[-1], self.eps, self.dtype, 'norm0')(x))
    if mode:
      h = resample(h, mode, self.resample_filter)
    h = conv(3, 'conv0')(h)
    h = adaptive_norm(self.adaptive_norm, feature_norm(self.norm, self.features, self.eps, self.dtype, 'norm1'), h,
                      emb, self.dtype)
    h = nn.Dropout(self.dropout, deterministic=not train)(nn.silu(h))
    h = conv(3, 'conv1', kernel_init=nn.initializers.zeros)(h)
    skip = resample(x, mode, self.resample_filter) if mode else x
    if self.features != x.shape[-1] or (mode and self.resample_proj):
      skip = conv(1, 'skip')(skip)
    x = (h + skip) * self.skip_scale
    if self.heads:
      b, hgt, wid, c = x.shape
      qkv = nn.Dense(3 * c, dtype=self.dtype, name='qkv')(
          feature_norm(self.norm, c, self.eps, self.dtype, 'norm2')(x))
      if self.chunked_qkv:
        q, k, v = jnp.moveaxis(qkv.reshape(b, hgt * wid, 3, self.heads, c // self.heads), 2, 0)
      else:
        q, k, v = jnp.moveaxis(qkv.reshape(b, hgt * wid, self.heads, c // self.heads, 3), -1, 0)
      a = attention_lib.attention(q, k, v, kernel=self.attention_kernel)
      a = nn.Dense(c, dtype=self.dtype, kernel_init=nn.initializers.zeros, name='proj')(a.reshape(b, hgt, wid, c))
      x = (x + a) * self.skip_scale
    return x


def _block_class(policy: str):
  """Block, or Block recomputed in the backward pass (model.remat, as blocks.remat_block)."""
  if not policy:
    return Block
  if policy != 'block' and not hasattr(jax.checkpoint_policies, policy):
    raise ValueError(f"model.remat={policy!r}; expected '', 'block' or a jax.checkpoint_policies name such as "
                     "'dots_with_no_batch_dims_saveable'.")
  return nn.remat(Block, static_argnums=(3,), policy=None if policy == 'block' else getattr(jax.checkpoint_policies,
                                                                                             policy))


class FourierFrequencies(nn.Module):
  """EDM's FourierEmbedding: [cos(2 pi f c), sin(2 pi f c)] with the frequencies f a parameter 'freqs' (EDM's
  buffer, drawn N(0, scale^2) at init) that no gradient reaches."""
  features: int
  scale: float = 16.0

  @nn.compact
  def __call__(self, c_noise):
    freqs = self.param('freqs', lambda rng, shape: self.scale * jax.random.normal(rng, shape), (self.features // 2,))
    angles = jnp.outer(c_noise, 2 * np.pi * jax.lax.stop_gradient(freqs))
    return jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)


def _positional(c_noise, features, endpoint):
  """EDM's PositionalEmbedding: [cos(w_i c), sin(w_i c)], w_i = (1/10000)^(i / (half - endpoint))."""
  half = features // 2
  freqs = (1.0 / 10_000) ** (np.arange(half, dtype=np.float32) / (half - (1 if endpoint else 0)))
  angles = jnp.outer(c_noise, freqs.astype(np.float32))
  return jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)


def _labels(net, cond, train):
  """One-hot labels [B, num_classes] (a label < 0 is all zeros), dropped with probability label_dropout in training;
  None for an unconditional network."""
  check_condition(net.num_classes, False, cond, None)
  if cond is None:
    return None
  return jax.nn.one_hot(drop_labels(net, cond, net.label_dropout, train), net.num_classes)  # a label < 0: zeros


def _augment(net, augment_labels, batch, dtype):
  """EDM's map_augment term (no bias; zero without augmentation labels, as EDM skips it); None without augment_dim."""
  if not net.augment_dim:
    if augment_labels is not None:
      raise ValueError('augment_labels were given to a network without model.augment_dim.')
    return None
  if augment_labels is None:
    augment_labels = jnp.zeros((batch, net.augment_dim), dtype)
  return augment_labels.astype(dtype)


def _check(net, guidance):
  if net.guidance_embedding or guidance is not None:
    raise ValueError("model.layout='edm' has no guidance-scale input (model.guidance_embedding).")


def _dense(features, dtype, name, bias=True):
  return nn.Dense(features, use_bias=bias, dtype=dtype, name=name)


def _output(out, dtype):
  return out.astype(jnp.promote_types(dtype, jnp.float32))  # bfloat16 compute gives float32; float64 stays


def _check_size(x, channel_mult):
  levels = len(channel_mult)
  if x.shape[1] % 2 ** (levels - 1) or x.shape[2] % 2 ** (levels - 1):
    raise ValueError(f'Spatial size {x.shape[1:3]} is not divisible by 2^{levels - 1} for channel_mult '
                     f'{channel_mult}.')


class SongEncoder(nn.Module):
  """SongUNet's `enc` (DhariwalUNet's with song=False): returns the skips, the last being the encoder's output."""
  channels: int
  channel_mult: Sequence[int]
  num_blocks: int
  attn_resolutions: Sequence[int]
  block: Any
  heads: Any  # width -> attention heads
  song: bool = True
  encoder_type: str = 'standard'
  resample_filter: Sequence[int] = (1, 1)
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, emb, train):
    skips, aux = [], x
    for level, mult in enumerate(self.channel_mult):
      res = x.shape[1] >> level
      if level == 0:
        stem = self.channels if self.song else self.channels * mult
        h = nn.Conv(stem, (3, 3), dtype=self.dtype, name=f'{res}x{res}_conv')(x)
      else:
        h = self.block(h.shape[-1], down=True, name=f'{res}x{res}_down')(h, emb, train)
        if self.encoder_type == 'residual':
          aux = self._fused_down(aux, h.shape[-1], f'{res}x{res}_aux_residual')
          h = aux = (h + aux) / np.sqrt(2)
      skips.append(h)
      for idx in range(self.num_blocks):
        features = self.channels * mult
        heads = self.heads(features) if res in self.attn_resolutions else 0
        h = self.block(features, heads=heads, name=f'{res}x{res}_block{idx}')(h, emb, train)
        skips.append(h)
    return skips

  def _fused_down(self, aux, features, name):
    """EDM's Conv2d(kernel=3, down=True, fused_resample=True): the conv padded by 1 + filter pad, then the filter
    applied with stride 2 and no padding."""
    taps = np.asarray(self.resample_filter, np.float32)
    pad = 1 + (len(taps) - 1) // 2
    aux = nn.Conv(features, (3, 3), padding=[(pad, pad)] * 2, dtype=self.dtype, name=name)(aux)
    kernel = np.outer(taps, taps) / np.sum(taps) ** 2
    kernel = jnp.asarray(np.tile(kernel[:, :, None, None], (1, 1, 1, features)), aux.dtype)
    return jax.lax.conv_general_dilated(aux, kernel, (2, 2), 'VALID', dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                        feature_group_count=features)


class SongDecoder(nn.Module):
  """SongUNet's `dec` (DhariwalUNet's with song=False). SongUNet returns its aux output image; DhariwalUNet the
  features its out_norm / out_conv map to the image."""
  channels: int
  channel_mult: Sequence[int]
  num_blocks: int
  attn_resolutions: Sequence[int]
  block: Any
  heads: Any
  out_channels: int
  song: bool = True
  decoder_type: str = 'standard'
  resample_filter: Sequence[int] = (1, 1)
  norm: str = 'group'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, h, skips, emb, train, resolution):
    levels, aux = len(self.channel_mult), None
    for level, mult in reversed(list(enumerate(self.channel_mult))):
      res = resolution >> level
      if level == levels - 1:
        h = self.block(h.shape[-1], heads=self.heads(h.shape[-1]), name=f'{res}x{res}_in0')(h, emb, train)
        h = self.block(h.shape[-1], name=f'{res}x{res}_in1')(h, emb, train)
      else:
        h = self.block(h.shape[-1], up=True, name=f'{res}x{res}_up')(h, emb, train)
      for idx in range(self.num_blocks + 1):
        h = jnp.concatenate([h, skips.pop()], axis=-1)
        features = self.channels * mult
        attend = res in self.attn_resolutions and (idx == self.num_blocks or not self.song)
        h = self.block(features, heads=self.heads(features) if attend else 0, name=f'{res}x{res}_block{idx}')(
            h, emb, train)
      if self.song and (self.decoder_type == 'skip' or level == 0):
        if self.decoder_type == 'skip' and level < levels - 1:
          aux = resample(aux, 'up', self.resample_filter)
        tmp = feature_norm(self.norm, h.shape[-1], 1e-6, self.dtype, f'{res}x{res}_aux_norm')(h)
        tmp = nn.Conv(self.out_channels, (3, 3), dtype=self.dtype, kernel_init=nn.initializers.zeros,
                      name=f'{res}x{res}_aux_conv')(nn.silu(tmp))
        aux = tmp if aux is None else tmp + aux
    return aux if self.song else h


def _song_sinusoids(net, features):
  """EDM's map_noise as a function of a time [B] -> [B, features], its sinusoids ordered [sin, cos] (EDM's swap)."""
  if net.time_embedding == 'fourier':
    embed = FourierFrequencies(features, net.time_scale, name='map_noise')  # one module: t and h share its freqs
  elif net.time_embedding == 'positional':
    embed = lambda c: _positional(net.time_scale * c, features, endpoint=True)
  else:
    raise ValueError(f"Unknown model.time_embedding {net.time_embedding!r}; known: ['fourier', 'positional'].")
  return lambda c: jnp.concatenate(jnp.split(embed(c), 2, axis=-1)[::-1], axis=-1)


def _zero_rows_after(rows):
  """A kernel init: the default (lecun-normal) for the first `rows` rows, as a kernel of only those rows would be
  drawn, and zeros for the rest."""
  def init(rng, shape, dtype=jnp.float32):
    head = nn.linear.default_kernel_init(rng, (rows,) + tuple(shape[1:]), dtype)
    return jnp.concatenate([head, jnp.zeros((shape[0] - rows,) + tuple(shape[1:]), dtype)])
  return init


def _song_mapping(net, c_noise, cond, train, augment_labels, interval, batch, dtype):
  """SongUNet's mapping of c_noise (and labels, augmentation labels) to the blocks' embedding [B, E]. With
  model.second_time, the MeanFlow port's: [map_noise(c_noise), map_noise(h)] of h = interval (None: 0), the width
  of map_label, map_augment and map_layer0's input doubled (interval_init 'zeros': map_layer0's rows of h start at
  zero, its others as a one-time network's)."""
  noise_features = net.channels * net.noise_mult
  sinusoids = _song_sinusoids(net, noise_features)
  emb, kernel_init = sinusoids(c_noise), nn.linear.default_kernel_init
  if net.second_time:
    emb = jnp.concatenate([emb, sinusoids(net.interval_input(interval, c_noise))], axis=-1)
    kernel_init = _zero_rows_after(noise_features) if net.interval_init == 'zeros' else kernel_init
  emb, width = emb.astype(dtype), emb.shape[-1]
  onehot = _labels(net, cond, train)
  if onehot is not None:
    emb = emb + _dense(width, dtype, 'map_label')(onehot * np.sqrt(net.num_classes))
  augment = _augment(net, augment_labels, batch, dtype)
  if augment is not None:
    emb = emb + _dense(width, dtype, 'map_augment', bias=False)(augment)
  emb = nn.silu(nn.Dense(net.channels * net.emb_mult, kernel_init=kernel_init, dtype=dtype, name='map_layer0')(emb))
  return nn.silu(_dense(net.channels * net.emb_mult, dtype, 'map_layer1')(emb))


def song_unet(net, x, c_noise, cond, train, guidance, augment_labels, interval=None):
  """EDM's SongUNet on the fields of `net` (an NCSNpp with layout='edm', inside its compact call); with
  model.second_time the MeanFlow port's, of the second time `interval` [B] (None: 0)."""
  _check(net, guidance)
  _check_size(x, net.channel_mult)
  if net.decoder_type not in DECODER_TYPES:
    raise ValueError(f'model.decoder_type={net.decoder_type!r}; expected one of {DECODER_TYPES}.')
  dtype = jnp.dtype(net.dtype)
  emb = _song_mapping(net, c_noise, cond, train, augment_labels, interval, x.shape[0], dtype)

  block = lambda features, **kw: _block_class(net.remat)(
      features, dropout=net.dropout, skip_scale=np.sqrt(0.5), eps=1e-6, resample_filter=tuple(net.resample_filter),
      resample_proj=True, adaptive_norm=net.adaptive_norm, attention_kernel=net.attention_kernel, dtype=dtype,
      norm=net.norm, chunked_qkv=net.second_time, **kw)
  heads = lambda features: 1
  shared = dict(channels=net.channels, channel_mult=tuple(net.channel_mult), num_blocks=net.num_res_blocks,
                attn_resolutions=tuple(net.attn_resolutions), block=block, heads=heads,
                resample_filter=tuple(net.resample_filter), dtype=dtype)
  skips = SongEncoder(encoder_type='residual' if net.residual_input else 'standard', name='enc', **shared)(
      x.astype(dtype), emb, train)
  out = SongDecoder(out_channels=x.shape[-1], decoder_type=net.decoder_type, norm=net.norm, name='dec', **shared)(
      skips[-1], skips, emb, train, x.shape[1])
  return _output(out, dtype)


def dhariwal_unet(net, x, c_noise, cond, train, guidance, augment_labels):
  """EDM's DhariwalUNet on the fields of `net` (an ADM with layout='edm', inside its compact call)."""
  _check(net, guidance)
  _check_size(x, net.channel_mult)
  if net.time_embedding != 'positional':
    raise ValueError("model.layout='edm' ADM (EDM's DhariwalUNet) has the positional embedding only; "
                     f'model.time_embedding={net.time_embedding!r}.')
  dtype = jnp.dtype(net.dtype)
  batch, emb_features = x.shape[0], net.channels * net.emb_mult
  emb = _positional(net.time_scale * c_noise, net.channels, endpoint=False).astype(dtype)
  augment = _augment(net, augment_labels, batch, dtype)
  if augment is not None:
    emb = emb + _dense(net.channels, dtype, 'map_augment', bias=False)(augment)
  emb = nn.silu(_dense(emb_features, dtype, 'map_layer0')(emb))
  emb = _dense(emb_features, dtype, 'map_layer1')(emb)
  onehot = _labels(net, cond, train)
  if onehot is not None:
    emb = emb + _dense(emb_features, dtype, 'map_label', bias=False)(onehot)
  emb = nn.silu(emb)

  block = lambda features, **kw: _block_class(net.remat)(
      features, dropout=net.dropout, adaptive_norm=net.adaptive_norm, attention_kernel=net.attention_kernel,
      dtype=dtype, norm=net.norm, **kw)
  heads = lambda features: features // net.head_dim
  shared = dict(channels=net.channels, channel_mult=tuple(net.channel_mult), num_blocks=net.num_res_blocks,
                attn_resolutions=tuple(net.attn_resolutions), block=block, heads=heads, song=False, dtype=dtype)
  skips = SongEncoder(name='enc', **shared)(x.astype(dtype), emb, train)
  h = SongDecoder(out_channels=x.shape[-1], name='dec', **shared)(skips[-1], skips, emb, train, x.shape[1])
  h = nn.silu(feature_norm(net.norm, h.shape[-1], 1e-5, dtype, 'out_norm')(h))
  out = nn.Conv(x.shape[-1], (3, 3), dtype=dtype, kernel_init=nn.initializers.zeros, name='out_conv')(h)
  return _output(out, dtype)
