"""The text-conditional UNet of Stable Diffusion (SD 1.x / 2.x / SDXL, LCM) in the module layout of diffusers'
`UNet2DConditionModel`, so that a diffusers `unet/` folder loads by renaming alone (cm_jax.formats.diffusers) and a
cm_jax-trained one exports to that format.

Parameter paths mirror diffusers' state-dict keys with '.' -> '/' and 'name.i' -> 'name_i', e.g.
`down_blocks_0/attentions_1/transformer_blocks_0/attn2/to_k/kernel` is
`down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k.weight`. Layout NHWC.

  t -> time_proj (sinusoid of block_out_channels[0] frequencies) -> time_embedding (linear_1, SiLU, linear_2) = emb,
       with timestep_cond (LCM's guidance-scale embedding) added to the sinusoid through cond_proj first;
       + class_embedding(class_labels) (num_class_embeds), + add_embedding(concat(text_embeds, add_time_proj(time_ids)))
       (SDXL's addition_embed_type='text_time').
  x -> conv_in -> down_blocks_i (resnets_j [, attentions_j], downsamplers_0 unless last) -> mid_block (resnets_0,
       attentions_0, resnets_1) -> up_blocks_i (layers + 1 resnets on [x, skip] [, attentions_j], upsamplers_0 unless
       last) -> conv_norm_out, SiLU -> conv_out. Every resnet, attention and resampler output of the down path is a
       skip, consumed last-first by the up path.
ResnetBlock2D: x' = (skip(x) + conv2(SiLU(norm2(conv1(SiLU(norm1(x))) + time_emb_proj(SiLU(emb)))))) / scale.
Transformer2DModel: x' = x + proj_out(blocks(proj_in(norm(x)))), proj_in/out 1x1 convs or linear layers.
BasicTransformerBlock: h += attn1(norm1 h); h += attn2(norm2 h, text); h += ff(norm3 h), ff = net_2(GEGLU(net_0)).
Heads follow diffusers: `attention_head_dim` (per block or one for all) is the number of heads of each block's
transformers, each head of width channels // heads (diffusers' historical naming, kept for its configs).
"""

from collections.abc import Sequence
import dataclasses
import math
from typing import Any

from etils import epath
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cm_jax.formats import diffusers as diffusers_format
from cm_jax.models.attention import attention

CLASS_NAME = 'UNet2DConditionModel'
DOWN_BLOCKS = ('CrossAttnDownBlock2D', 'DownBlock2D')
UP_BLOCKS = ('CrossAttnUpBlock2D', 'UpBlock2D')
MID_BLOCKS = ('UNetMidBlock2DCrossAttn', None)
# Options of diffusers' config this module reads only at their default value: (key, default).
_DEFAULT_ONLY = (('act_fn', 'silu'), ('time_embedding_type', 'positional'), ('time_embedding_act_fn', None),
                 ('timestep_post_act', None), ('class_embed_type', None), ('encoder_hid_dim', None),
                 ('encoder_hid_dim_type', None), ('attention_type', 'default'), ('dual_cross_attention', False),
                 ('only_cross_attention', False), ('mid_block_only_cross_attention', None),
                 ('cross_attention_norm', None), ('resnet_time_scale_shift', 'default'), ('num_attention_heads', None),
                 ('resnet_out_scale_factor', 1.0))


def sinusoid(t, dim: int, flip_sin_to_cos: bool, freq_shift: float):
  """diffusers' Timesteps: [sin(t f_k), cos(t f_k)] (cos first when flipped), f_k = exp(-ln(1e4) k / (dim/2 - shift)),
  k < dim/2, zero-padded to dim; float32 [B, dim] of t [B]."""
  half = dim // 2
  freqs = jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift))
  angles = jnp.asarray(t, jnp.float32)[:, None] * freqs[None]
  parts = (jnp.cos(angles), jnp.sin(angles)) if flip_sin_to_cos else (jnp.sin(angles), jnp.cos(angles))
  emb = jnp.concatenate(parts, axis=-1)
  return jnp.pad(emb, ((0, 0), (0, dim % 2)))


def _dense(features, name, dtype, use_bias=True):
  return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32, name=name)


def _conv(features, kernel, name, dtype, strides=1, padding='SAME'):
  return nn.Conv(features, (kernel, kernel), strides=(strides, strides), padding=padding, dtype=dtype,
                 param_dtype=jnp.float32, name=name)


def _group_norm(groups, eps, name, dtype):
  return nn.GroupNorm(num_groups=groups, epsilon=eps, use_fast_variance=False, dtype=dtype, param_dtype=jnp.float32,
                      name=name)


class TimestepEmbedding(nn.Module):
  """linear_2(SiLU(linear_1(x + cond_proj(condition)))); cond_proj (no bias) only when a condition is given."""
  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, condition=None):
    if condition is not None:
      x = x + _dense(x.shape[-1], 'cond_proj', self.dtype, use_bias=False)(condition)
    return _dense(self.features, 'linear_2', self.dtype)(nn.silu(_dense(self.features, 'linear_1', self.dtype)(x)))


class ResnetBlock2D(nn.Module):
  """(skip(x) + conv2(SiLU(norm2(conv1(SiLU(norm1(x))) + time_emb_proj(SiLU(emb)))))) / output_scale_factor, skip a
  1x1 conv_shortcut when the widths differ."""
  features: int
  groups: int
  eps: float
  output_scale_factor: float = 1.0
  skip_time_act: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, emb):
    norm = lambda name: _group_norm(self.groups, self.eps, name, self.dtype)
    h = _conv(self.features, 3, 'conv1', self.dtype)(nn.silu(norm('norm1')(x)))
    emb = emb if self.skip_time_act else nn.silu(emb)
    h = h + _dense(self.features, 'time_emb_proj', self.dtype)(emb)[:, None, None, :]
    h = _conv(self.features, 3, 'conv2', self.dtype)(nn.silu(norm('norm2')(h)))
    if x.shape[-1] != self.features:
      x = _conv(self.features, 1, 'conv_shortcut', self.dtype)(x)
    return (x + h) / self.output_scale_factor


class Attention(nn.Module):
  """to_out_0(softmax(q k^T / sqrt(head_dim)) v) over `heads` heads, q = to_q(x), k, v = to_k, to_v(context or x)
  (no biases); `upcast` computes the softmax attention in float32."""
  heads: int
  head_dim: int
  upcast: bool = False
  kernel: str = 'xla'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, context=None):
    inner = self.heads * self.head_dim
    source = x if context is None else context
    split = lambda t: t.reshape(t.shape[:2] + (self.heads, self.head_dim))
    q = split(_dense(inner, 'to_q', self.dtype, use_bias=False)(x))
    k = split(_dense(inner, 'to_k', self.dtype, use_bias=False)(source))
    v = split(_dense(inner, 'to_v', self.dtype, use_bias=False)(source))
    if self.upcast:
      q, k, v = (t.astype(jnp.float32) for t in (q, k, v))
    out = attention(q, k, v, self.kernel if context is None else 'xla')  # the flash kernels take self-attention only
    out = out.astype(self.dtype).reshape(x.shape[:2] + (inner,))
    return _dense(x.shape[-1], 'to_out_0', self.dtype)(out)


class GEGLU(nn.Module):
  """a * GELU(b) (exact GELU) of [a, b] = proj(x), 2 features each."""
  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    a, b = jnp.split(_dense(2 * self.features, 'proj', self.dtype)(x), 2, axis=-1)
    return a * nn.gelu(b, approximate=False)


class FeedForward(nn.Module):
  """net_2(GEGLU net_0(x)) with 4 x the width inside."""
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    h = GEGLU(4 * x.shape[-1], dtype=self.dtype, name='net_0')(x)
    return _dense(x.shape[-1], 'net_2', self.dtype)(h)


class BasicTransformerBlock(nn.Module):
  """h += attn1(norm1 h) (self); h += attn2(norm2 h, context) (cross); h += ff(norm3 h); LayerNorms of eps 1e-5."""
  heads: int
  head_dim: int
  upcast: bool = False
  kernel: str = 'xla'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, h, context):
    norm = lambda name: nn.LayerNorm(epsilon=1e-5, use_fast_variance=False, dtype=self.dtype, param_dtype=jnp.float32,
                                     name=name)
    attend = lambda name: Attention(self.heads, self.head_dim, upcast=self.upcast, kernel=self.kernel, dtype=self.dtype,
                                       name=name)
    h = h + attend('attn1')(norm('norm1')(h))
    h = h + attend('attn2')(norm('norm2')(h), context)
    return h + FeedForward(dtype=self.dtype, name='ff')(norm('norm3')(h))


class Transformer2DModel(nn.Module):
  """x + proj_out(transformer_blocks(proj_in(norm(x)))) over the H W positions; proj_in / proj_out 1x1 convs, or
  linear layers on the flattened positions with use_linear_projection (numerically the same map, other weights)."""
  heads: int
  head_dim: int
  num_layers: int
  groups: int
  use_linear_projection: bool
  upcast: bool = False
  kernel: str = 'xla'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, context):
    b, hgt, wid, c = x.shape
    inner = self.heads * self.head_dim
    h = _group_norm(self.groups, 1e-6, 'norm', self.dtype)(x)
    if self.use_linear_projection:
      h = _dense(inner, 'proj_in', self.dtype)(h.reshape(b, hgt * wid, c))
    else:
      h = _conv(inner, 1, 'proj_in', self.dtype)(h).reshape(b, hgt * wid, inner)
    for j in range(self.num_layers):
      h = BasicTransformerBlock(self.heads, self.head_dim, upcast=self.upcast, kernel=self.kernel, dtype=self.dtype,
                                name=f'transformer_blocks_{j}')(h, context)
    if self.use_linear_projection:
      h = _dense(c, 'proj_out', self.dtype)(h).reshape(b, hgt, wid, c)
    else:
      h = _conv(c, 1, 'proj_out', self.dtype)(h.reshape(b, hgt, wid, inner))
    return x + h


class Downsample2D(nn.Module):
  """A 3x3 conv of stride 2, padded by `padding` on every side (0: one row / column at the bottom / right only)."""
  padding: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    pad = ((self.padding, self.padding),) * 2 if self.padding else ((0, 1), (0, 1))
    return _conv(x.shape[-1], 3, 'conv', self.dtype, strides=2, padding=pad)(x)


class Upsample2D(nn.Module):
  """Nearest-neighbour resize to `size` (PyTorch's rule, source index floor(i * in / out); 2x in the usual case),
  then a 3x3 conv."""
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, size):
    rows = np.minimum(np.arange(size[0]) * x.shape[1] // size[0], x.shape[1] - 1)
    cols = np.minimum(np.arange(size[1]) * x.shape[2] // size[1], x.shape[2] - 1)
    x = x[:, rows][:, :, cols]
    return _conv(x.shape[-1], 3, 'conv', self.dtype)(x)


class _Blocks(nn.Module):
  """Shared settings of the down / mid / up blocks."""
  features: int
  groups: int
  eps: float
  heads: int
  use_linear_projection: bool
  upcast: bool
  kernel: str
  remat: bool
  skip_time_act: bool
  dtype: Any

  def resnet(self, name, scale=1.0):
    cls = nn.remat(ResnetBlock2D) if self.remat else ResnetBlock2D
    return cls(self.features, self.groups, self.eps, output_scale_factor=scale, skip_time_act=self.skip_time_act,
               dtype=self.dtype, name=name)

  def transformer(self, name, num_layers):
    cls = nn.remat(Transformer2DModel) if self.remat else Transformer2DModel
    return cls(self.heads, self.features // self.heads, num_layers, self.groups, self.use_linear_projection,
               upcast=self.upcast, kernel=self.kernel, dtype=self.dtype, name=name)


class DownBlock(_Blocks):
  """CrossAttnDownBlock2D (`transformer_layers` given: a transformer after each resnet) or DownBlock2D: resnets_j
  [, attentions_j], then downsamplers_0 when `downsample`; returns (x, the skips: every layer's and the resampler's
  output)."""
  num_layers: int = 1
  transformer_layers: Sequence[int] = ()
  downsample: bool = True
  downsample_padding: int = 1

  @nn.compact
  def __call__(self, x, emb, context):
    skips = []
    for j in range(self.num_layers):
      x = self.resnet(f'resnets_{j}')(x, emb)
      if self.transformer_layers:
        x = self.transformer(f'attentions_{j}', self.transformer_layers[j])(x, context)
      skips.append(x)
    if self.downsample:
      x = Downsample2D(self.downsample_padding, dtype=self.dtype, name='downsamplers_0')(x)
      skips.append(x)
    return x, skips


class UpBlock(_Blocks):
  """CrossAttnUpBlock2D / UpBlock2D: resnets_j on concat(x, the last skip) [, attentions_j], then upsamplers_0 to
  `size` when given."""
  num_layers: int = 1
  transformer_layers: Sequence[int] = ()

  @nn.compact
  def __call__(self, x, skips, emb, context, size=None):
    for j in range(self.num_layers):
      x = jnp.concatenate([x, skips[-1 - j].astype(x.dtype)], axis=-1)
      x = self.resnet(f'resnets_{j}')(x, emb)
      if self.transformer_layers:
        x = self.transformer(f'attentions_{j}', self.transformer_layers[j])(x, context)
    if size is not None:
      x = Upsample2D(dtype=self.dtype, name='upsamplers_0')(x, size)
    return x


class MidBlock(_Blocks):
  """UNetMidBlock2DCrossAttn: resnets_0, then (attentions_i, resnets_{i+1}) pairs, outputs / output_scale_factor."""
  transformer_layers: Sequence[int] = (1,)
  output_scale_factor: float = 1.0

  @nn.compact
  def __call__(self, x, emb, context):
    x = self.resnet('resnets_0', self.output_scale_factor)(x, emb)
    for i, layers in enumerate(self.transformer_layers):
      x = self.transformer(f'attentions_{i}', layers)(x, context)
      x = self.resnet(f'resnets_{i + 1}', self.output_scale_factor)(x, emb)
    return x


class UNet2DConditionModel(nn.Module):
  """diffusers' UNet2DConditionModel (module docstring), built by `module_from_config` from its config.json.

  Per-block tuples, one entry per level in down order: layers_per_block, attention_heads (diffusers'
  attention_head_dim). down_transformer_layers / up_transformer_layers: the transformer depth after each resnet of
  each block (up blocks in up order), () for a block without attention (DownBlock2D / UpBlock2D); mid_block: whether
  there is a UNetMidBlock2DCrossAttn. `dtype` is the compute dtype (parameters stay float32); `remat` rematerialises
  each resnet and transformer in the backward pass; `attention_kernel` as cm_jax.models.attention (self-attention).
  """
  in_channels: int = 4
  out_channels: int = 4
  block_out_channels: Sequence[int] = (320, 640, 1280, 1280)
  layers_per_block: Sequence[int] = (2, 2, 2, 2)
  attention_heads: Sequence[int] = (8, 8, 8, 8)
  down_transformer_layers: Sequence[Sequence[int]] = ((1, 1),) * 3 + ((),)
  up_transformer_layers: Sequence[Sequence[int]] = ((),) + ((1, 1, 1),) * 3
  mid_block: bool = True
  mid_transformer_layers: int = 1
  cross_attention_dim: int = 768
  use_linear_projection: bool = False
  upcast_attention: bool = False
  norm_num_groups: int = 32
  norm_eps: float = 1e-5
  flip_sin_to_cos: bool = True
  freq_shift: float = 0.0
  center_input_sample: bool = False
  time_embedding_dim: int | None = None
  time_cond_proj_dim: int | None = None
  num_class_embeds: int | None = None
  class_embeddings_concat: bool = False
  addition_embed_type: str | None = None
  addition_time_embed_dim: int | None = None
  projection_class_embeddings_input_dim: int | None = None
  downsample_padding: int = 1
  mid_block_scale_factor: float = 1.0
  resnet_skip_time_act: bool = False
  conv_in_kernel: int = 3
  conv_out_kernel: int = 3
  attention_kernel: str = 'xla'
  remat: bool = False
  dtype: Any = jnp.float32

  def _settings(self, level):
    return dict(features=self.block_out_channels[level], groups=self.norm_num_groups, eps=self.norm_eps,
                heads=self.attention_heads[level], use_linear_projection=self.use_linear_projection,
                upcast=self.upcast_attention, kernel=self.attention_kernel, remat=self.remat,
                skip_time_act=self.resnet_skip_time_act, dtype=self.dtype)

  def embedding(self, batch, timesteps, timestep_cond, class_labels, added_cond):
    """emb [B, time_embed_dim (2x with class_embeddings_concat)] of the timesteps and the extra conditions."""
    width = self.block_out_channels[0]
    timesteps = jnp.broadcast_to(jnp.asarray(timesteps, jnp.float32).reshape(-1), (batch,))
    t_emb = sinusoid(timesteps, width, self.flip_sin_to_cos, self.freq_shift).astype(self.dtype)
    features = self.time_embedding_dim or 4 * width
    if self.time_cond_proj_dim is not None and timestep_cond is None:
      raise ValueError(f'This UNet has time_cond_proj_dim={self.time_cond_proj_dim}: pass timestep_cond (LCM\'s '
                       'guidance-scale embedding) [B, time_cond_proj_dim].')
    condition = None if self.time_cond_proj_dim is None else jnp.asarray(timestep_cond, self.dtype)
    emb = TimestepEmbedding(features, dtype=self.dtype, name='time_embedding')(t_emb, condition)
    if self.num_class_embeds is not None:
      if class_labels is None:
        raise ValueError(f'This UNet has num_class_embeds={self.num_class_embeds}: pass class_labels [B].')
      class_emb = nn.Embed(self.num_class_embeds, features, name='class_embedding')(class_labels)
      class_emb = class_emb.astype(emb.dtype)
      emb = jnp.concatenate([emb, class_emb], -1) if self.class_embeddings_concat else emb + class_emb
    if self.addition_embed_type == 'text_time':
      if not added_cond or 'text_embeds' not in added_cond or 'time_ids' not in added_cond:
        raise ValueError("This UNet has addition_embed_type='text_time' (SDXL): pass added_cond=dict(text_embeds="
                         "pooled text embeddings [B, D], time_ids [B, n]).")
      time_ids = jnp.asarray(added_cond['time_ids'], jnp.float32)
      time_embeds = sinusoid(time_ids.reshape(-1), self.addition_time_embed_dim, self.flip_sin_to_cos,
                             self.freq_shift).reshape(batch, -1)
      add = jnp.concatenate([jnp.asarray(added_cond['text_embeds'], jnp.float32), time_embeds], -1).astype(self.dtype)
      emb = emb + TimestepEmbedding(features, dtype=self.dtype, name='add_embedding')(add)
    return emb

  @nn.compact
  def __call__(self, sample, timesteps, encoder_hidden_states, added_cond=None, timestep_cond=None,
               class_labels=None):
    """The UNet's output [B, H, W, out_channels] (float32) for sample [B, H, W, in_channels], timesteps [B] (or one),
    encoder_hidden_states [B, L, cross_attention_dim]; added_cond / timestep_cond / class_labels as configured."""
    x = jnp.asarray(sample, self.dtype)
    if self.center_input_sample:
      x = 2 * x - 1.0
    emb = self.embedding(x.shape[0], timesteps, timestep_cond, class_labels, added_cond)
    context = jnp.asarray(encoder_hidden_states, self.dtype)
    x = _conv(self.block_out_channels[0], self.conv_in_kernel, 'conv_in', self.dtype)(x)
    skips = [x]
    levels = len(self.block_out_channels)
    for i in range(levels):
      x, out = DownBlock(**self._settings(i), num_layers=self.layers_per_block[i],
                         transformer_layers=tuple(self.down_transformer_layers[i]), downsample=i < levels - 1,
                         downsample_padding=self.downsample_padding, name=f'down_blocks_{i}')(x, emb, context)
      skips += out
    if self.mid_block:
      x = MidBlock(**self._settings(levels - 1), transformer_layers=(self.mid_transformer_layers,),
                   output_scale_factor=self.mid_block_scale_factor, name='mid_block')(x, emb, context)
    for i in range(levels):
      level = levels - 1 - i
      layers = self.layers_per_block[level] + 1
      mine, skips = skips[-layers:], skips[:-layers]
      size = skips[-1].shape[1:3] if i < levels - 1 else None  # the next level's resolution
      x = UpBlock(**self._settings(level), num_layers=layers, transformer_layers=tuple(self.up_transformer_layers[i]),
                  name=f'up_blocks_{i}')(x, mine, emb, context, size)
    x = nn.silu(_group_norm(self.norm_num_groups, self.norm_eps, 'conv_norm_out', self.dtype)(x))
    return _conv(self.out_channels, self.conv_out_kernel, 'conv_out', self.dtype)(x).astype(jnp.float32)

  def example_inputs(self, batch: int = 1, side: int | None = None, length: int = 1):
    """Zero inputs (args, kwargs) of the right feature sizes for `init` / `jax.eval_shape` (parameter shapes depend on
    neither the side nor the text length)."""
    side = side or 2 ** (len(self.block_out_channels) - 1)
    kwargs = {}
    if self.time_cond_proj_dim is not None:
      kwargs['timestep_cond'] = jnp.zeros((batch, self.time_cond_proj_dim))
    if self.num_class_embeds is not None:
      kwargs['class_labels'] = jnp.zeros((batch,), jnp.int32)
    if self.addition_embed_type == 'text_time':  # any split of the projection's input gives the same shapes
      text = self.projection_class_embeddings_input_dim - self.addition_time_embed_dim
      kwargs['added_cond'] = {'text_embeds': jnp.zeros((batch, text)), 'time_ids': jnp.zeros((batch, 1))}
    args = (jnp.zeros((batch, side, side, self.in_channels)), jnp.zeros((batch,)),
            jnp.zeros((batch, length, self.cross_attention_dim)))
    return args, kwargs


def guidance_scale_embedding(w, dim: int):
  """LCM's w-embedding [B, dim]: [sin(1000 w f_k), cos(1000 w f_k)], f_k = 10000^(-k / (dim/2 - 1)), k < dim/2."""
  half = dim // 2
  freqs = jnp.exp(jnp.arange(half, dtype=jnp.float32) * -(math.log(10000.0) / (half - 1)))  # diffusers' float32 order
  angles = (1000.0 * jnp.asarray(w, jnp.float32))[:, None] * freqs[None]
  emb = jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], -1)
  return jnp.pad(emb, ((0, 0), (0, dim % 2)))


class TextUNet(nn.Module):
  """A UNet2DConditionModel as a cm_jax network F(x, c_noise, cond; s) (models/apply.py), its parameters under 'unet'.

  c_noise is the VP timestep; cond a models.apply.TextCondition. With `guidance_embedding` the UNet has LCM's
  guidance input: s (cm_jax's guidance scale, diffusers' guidance_scale, 1 + LCM's w) reaches time_cond_proj_dim
  (= guidance_dim) as guidance_scale_embedding(s - 1), as diffusers' LCM pipeline feeds it; without, the same UNet
  has no cond_proj layer (the teacher of a guidance-input student). `unet` holds the UNet's fields, time_cond_proj_dim
  aside, as sorted (name, value) pairs (a hashable module field).
  """
  unet: tuple
  guidance_embedding: bool = False
  guidance_dim: int = 256
  text_conditioned = True  # models.apply.can_guide: the empty prompt is the unconditional branch

  @nn.compact
  def __call__(self, x, c_noise, cond, train: bool = False, guidance=None):
    del train  # the Stable Diffusion UNet has no dropout
    fields = dict(self.unet, time_cond_proj_dim=self.guidance_dim if self.guidance_embedding else None)
    timestep_cond = None
    if self.guidance_embedding:  # guidance None (init): s = 1
      s = jnp.ones((x.shape[0],)) if guidance is None else jnp.broadcast_to(guidance, (x.shape[0],))
      timestep_cond = guidance_scale_embedding(s - 1.0, self.guidance_dim)
    added = None if cond.pooled is None else {'text_embeds': cond.pooled, 'time_ids': cond.time_ids}
    return UNet2DConditionModel(**fields, name='unet')(x, c_noise, cond.hidden_states, added_cond=added,
                                                       timestep_cond=timestep_cond)

  def diffusers_config(self, source: dict) -> dict:
    """The diffusers config.json of this network: `source` (the pipeline's or the run's UNet config) with this
    network's guidance input (time_cond_proj_dim)."""
    return dict(source, _class_name=CLASS_NAME,
                time_cond_proj_dim=self.guidance_dim if self.guidance_embedding else None)


def text_unet(config: dict, where: str, guidance_embedding: bool = False, guidance_dim: int = 256,
              **overrides) -> TextUNet:
  """The TextUNet of a diffusers UNet config; a config with time_cond_proj_dim (an LCM UNet) has the guidance input
  of that width whatever `guidance_embedding` says."""
  unet = module_from_config(config, where, **overrides)
  if unet.time_cond_proj_dim is not None:
    guidance_embedding, guidance_dim = True, int(unet.time_cond_proj_dim)
  fields = {f.name: getattr(unet, f.name) for f in dataclasses.fields(unet)
            if f.name not in ('parent', 'name', 'time_cond_proj_dim')}
  return TextUNet(unet=tuple(sorted(fields.items())), guidance_embedding=guidance_embedding,
                  guidance_dim=guidance_dim)


# ----------------------------------------------------------------------------------------------------------
# diffusers' unet/ folders: config.json and safetensors (one file, the fp16 variant, or shards with an index).
# ----------------------------------------------------------------------------------------------------------
def _is_default(value, default) -> bool:
  """Whether a config value (or every entry of a per-block list) is the default; None and False count as one."""
  if isinstance(value, (list, tuple)):
    return all(_is_default(v, default) for v in value)
  return value == default or (value in (None, False) and default in (None, False))


def _per_block(config, key, default, levels, where):
  """config[key] as a tuple of one entry per level (an int or a list of them given)."""
  value = config.get(key, default)
  if value is None:
    value = default
  value = tuple(value) if isinstance(value, (list, tuple)) else (value,) * levels
  if len(value) != levels:
    raise ValueError(f'{where}: {key}={list(value)} has {len(value)} entries for {levels} blocks.')
  return value


def _layers(entry, count):
  """A block's transformer depth per layer: an int for all `count` layers, or a list of them."""
  return tuple(entry) if isinstance(entry, (list, tuple)) else (int(entry),) * count


def module_from_config(config: dict, where: str, **overrides) -> UNet2DConditionModel:
  """The UNet2DConditionModel a diffusers config.json describes; ValueError naming what is not supported
  (another model class, block types, or options this module reads only at their default). `overrides` set the
  module's own options (dtype, remat, attention_kernel)."""
  if config.get('_class_name') != CLASS_NAME:
    raise ValueError(f'{where} describes a {config.get("_class_name")!r}, not a {CLASS_NAME} (the text-conditional '
                     'UNet of Stable Diffusion).')
  for key, default in _DEFAULT_ONLY:
    if not _is_default(config.get(key, default), default):
      raise ValueError(f'{where}: {key}={config[key]!r}; cm_jax reads {CLASS_NAME}s with {key}={default!r} only.')
  widths = tuple(config.get('block_out_channels', (320, 640, 1280, 1280)))
  levels = len(widths)
  down = tuple(config.get('down_block_types', ('CrossAttnDownBlock2D',) * 3 + ('DownBlock2D',)))
  up = tuple(config.get('up_block_types', ('UpBlock2D',) + ('CrossAttnUpBlock2D',) * 3))
  mid = config.get('mid_block_type', 'UNetMidBlock2DCrossAttn')
  for key, types, known in (('down_block_types', down, DOWN_BLOCKS), ('up_block_types', up, UP_BLOCKS)):
    unsupported = sorted(set(types) - set(known))
    if unsupported or len(types) != levels:
      raise ValueError(f'{where}: {key}={list(types)}; cm_jax reads {" / ".join(known)} blocks only, one per '
                       f'block_out_channels entry (unsupported: {unsupported}).')
  if mid not in MID_BLOCKS:
    raise ValueError(f'{where}: mid_block_type={mid!r}; cm_jax reads {MID_BLOCKS[0]} (or none) only.')
  addition = config.get('addition_embed_type')
  if addition not in (None, 'text_time'):
    raise ValueError(f"{where}: addition_embed_type={addition!r}; cm_jax reads None or 'text_time' (SDXL) only.")
  cross = _per_block(config, 'cross_attention_dim', 1280, levels, where)
  if len(set(cross)) != 1:
    raise ValueError(f'{where}: cross_attention_dim={list(cross)}; cm_jax reads one text width for all blocks.')
  layers = tuple(int(n) for n in _per_block(config, 'layers_per_block', 2, levels, where))
  heads = tuple(int(n) for n in _per_block(config, 'attention_head_dim', 8, levels, where))
  depth = _per_block(config, 'transformer_layers_per_block', 1, levels, where)
  reverse = config.get('reverse_transformer_layers_per_block') or tuple(reversed(depth))
  down_depth = tuple(_layers(d, layers[i]) if kind.startswith('CrossAttn') else ()
                     for i, (kind, d) in enumerate(zip(down, depth)))
  up_depth = tuple(_layers(d, layers[levels - 1 - i] + 1) if kind.startswith('CrossAttn') else ()
                   for i, (kind, d) in enumerate(zip(up, reverse)))
  mid_depth = depth[-1] if isinstance(depth[-1], int) else depth[-1][0]
  if addition == 'text_time' and not (config.get('addition_time_embed_dim') and
                                      config.get('projection_class_embeddings_input_dim')):
    raise ValueError(f"{where}: addition_embed_type='text_time' needs addition_time_embed_dim and "
                     'projection_class_embeddings_input_dim.')
  return UNet2DConditionModel(
      in_channels=int(config.get('in_channels', 4)), out_channels=int(config.get('out_channels', 4)),
      block_out_channels=widths, layers_per_block=layers, attention_heads=heads, down_transformer_layers=down_depth,
      up_transformer_layers=up_depth, mid_block=mid is not None, mid_transformer_layers=int(mid_depth),
      cross_attention_dim=int(cross[0]), use_linear_projection=bool(config.get('use_linear_projection', False)),
      upcast_attention=bool(config.get('upcast_attention', False)),
      norm_num_groups=int(config.get('norm_num_groups', 32)), norm_eps=float(config.get('norm_eps', 1e-5)),
      flip_sin_to_cos=bool(config.get('flip_sin_to_cos', True)), freq_shift=float(config.get('freq_shift', 0)),
      center_input_sample=bool(config.get('center_input_sample', False)),
      time_embedding_dim=config.get('time_embedding_dim'), time_cond_proj_dim=config.get('time_cond_proj_dim'),
      num_class_embeds=config.get('num_class_embeds'),
      class_embeddings_concat=bool(config.get('class_embeddings_concat', False)), addition_embed_type=addition,
      addition_time_embed_dim=config.get('addition_time_embed_dim'),
      projection_class_embeddings_input_dim=config.get('projection_class_embeddings_input_dim'),
      downsample_padding=int(config.get('downsample_padding', 1)),
      mid_block_scale_factor=float(config.get('mid_block_scale_factor', 1.0)),
      resnet_skip_time_act=bool(config.get('resnet_skip_time_act', False)),
      conv_in_kernel=int(config.get('conv_in_kernel', 3)), conv_out_kernel=int(config.get('conv_out_kernel', 3)),
      **overrides)


def load_unet(folder, **overrides):
  """(module, float32 params, config) of a diffusers UNet2DConditionModel folder (e.g. a pipeline's unet/).

  `overrides` as module_from_config. ValueError on an unreadable file or a tensor missing, unexpected or of the wrong
  shape (naming it and both shapes)."""
  config_path = epath.Path(folder) / diffusers_format.CONFIG_FILE
  config = diffusers_format.read_json(config_path)
  module = module_from_config(config, str(config_path), **overrides)
  state_dict, where = diffusers_format.read_weights(folder, diffusers_format.DIFFUSERS_STEM)
  args, kwargs = module.example_inputs()
  abstract = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), *args, **kwargs))
  return module, diffusers_format.from_diffusers(state_dict, abstract['params'], where), config


def export_unet(folder, config: dict, params) -> None:
  """Writes `params` as a diffusers UNet2DConditionModel folder (`config` with its _class_name set)."""
  diffusers_format.write_model(folder, jax.device_get(params), dict(config, _class_name=CLASS_NAME))
