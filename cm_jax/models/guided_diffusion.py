"""The guided-diffusion UNet of the CM paper's releases (openai/consistency_models `cm/unet.py`, UNetModel) as a
module tree named like its state dicts: `ADM(layout='guided_diffusion')`.

Flax paths are the PyTorch names with a list index joined to its parent (formats/diffusers.flax_path):
'input_blocks.1.0.in_layers.2.weight' -> 'input_blocks_1_0/in_layers_2/kernel'. As in cm/unet.py: GroupNorm of 32
groups, [cos, sin] of t (1/10000)^(i/half) with t = time_scale * c_noise (1000 c_noise = 250 ln sigma, the CM
code's rescaled time), class labels through an embedding table added after time_embed, adaptive_norm 'scale_shift'
(use_scale_shift_norm) or 'shift', resblock_updown (resampling residual blocks) or a stride-2 conv / nearest-upsampling
conv, attention heads of head_dim channels with the qkv channels ordered (q|k|v, head, channel).
"""


import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from cm_jax.models import attention as attention_lib
from cm_jax.models.layers import check_condition, drop_labels


def _norm(name):
  return nn.GroupNorm(num_groups=32, epsilon=1e-5, name=name)


def _conv(features, name, size=3, **kw):
  return nn.Conv(features, (size, size), padding=[(size // 2, size // 2)] * 2, name=name, **kw)


def _down(x):
  return nn.avg_pool(x, (2, 2), (2, 2))


def _up(x):
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


class ResBlock(nn.Module):
  """cm/unet.py's ResBlock: in_layers (norm, SiLU, conv), emb_layers (SiLU, dense), out_layers (norm, SiLU, dropout,
  conv), skip_connection (a 1x1 conv where the width changes); up / down resample h and x after in_layers' SiLU."""
  features: int
  scale_shift: bool = True
  up: bool = False
  down: bool = False
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x, emb, train):
    h = nn.silu(_norm('in_layers_0')(x))
    if self.up or self.down:
      resample = _up if self.up else _down
      h, x = resample(h), resample(x)
    h = _conv(self.features, 'in_layers_2')(h)
    emb_out = nn.Dense(self.features * (2 if self.scale_shift else 1), name='emb_layers_1')(nn.silu(emb))
    emb_out = emb_out[:, None, None, :]
    if self.scale_shift:
      scale, shift = jnp.split(emb_out, 2, axis=-1)
      h = _norm('out_layers_0')(h) * (1 + scale) + shift
    else:
      h = _norm('out_layers_0')(h + emb_out)
    h = nn.Dropout(self.dropout, deterministic=not train)(nn.silu(h))
    h = _conv(self.features, 'out_layers_3', kernel_init=nn.initializers.zeros)(h)
    skip = x if x.shape[-1] == self.features else _conv(self.features, 'skip_connection', size=1)(x)
    return skip + h


class Downsample(nn.Module):
  """cm/unet.py's Downsample with a conv: a stride-2 3x3 conv named 'op'."""

  @nn.compact
  def __call__(self, x):
    return nn.Conv(x.shape[-1], (3, 3), strides=(2, 2), padding=[(1, 1)] * 2, name='op')(x)


class Upsample(nn.Module):
  """cm/unet.py's Upsample with a conv: nearest-neighbour 2x, then a 3x3 conv named 'conv'."""

  @nn.compact
  def __call__(self, x):
    return _conv(x.shape[-1], 'conv')(_up(x))


class AttentionBlock(nn.Module):
  """cm/unet.py's AttentionBlock: x + proj_out(attention(qkv(norm(x)))), heads = C / head_dim (head_dim 0: one)."""
  head_dim: int = 64
  attention_kernel: str = 'xla'

  @nn.compact
  def __call__(self, x):
    b, hgt, wid, c = x.shape
    heads = c // self.head_dim if self.head_dim else 1
    qkv = nn.Dense(3 * c, name='qkv')(_norm('norm')(x)).reshape(b, hgt * wid, 3, heads, c // heads)
    a = attention_lib.attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], kernel=self.attention_kernel)
    return x + nn.Dense(c, kernel_init=nn.initializers.zeros, name='proj_out')(a.reshape(b, hgt, wid, c))


def _check(net, x, cond, guidance) -> None:
  """Raises ValueError for the fields and inputs the guided-diffusion layout does not have."""
  if net.guidance_embedding or guidance is not None:
    raise ValueError("model.layout='guided_diffusion' has no guidance-scale input (model.guidance_embedding).")
  check_condition(net.num_classes, False, cond, None)
  if jnp.dtype(net.dtype) != jnp.float32 or net.norm != 'group' or net.remat or net.augment_dim:
    raise ValueError("model.layout='guided_diffusion' runs in float32 with GroupNorm, without remat or augment_dim.")
  if net.time_embedding != 'positional':
    raise ValueError("model.layout='guided_diffusion' has the positional embedding only; "
                     f'model.time_embedding={net.time_embedding!r}.')
  if net.adaptive_norm not in ('scale_shift', 'shift'):
    raise ValueError("model.layout='guided_diffusion' takes adaptive_norm 'scale_shift' or 'shift'.")
  levels = len(net.channel_mult)
  if x.shape[1] % 2 ** (levels - 1) or x.shape[2] % 2 ** (levels - 1):
    raise ValueError(f'Spatial size {x.shape[1:3]} is not divisible by 2^{levels - 1} for channel_mult '
                     f'{net.channel_mult}.')


def _embedding(net, c_noise, cond, train):
  """emb = time_embed_2(SiLU(time_embed_0([cos, sin](time_scale c_noise f)))) + label_emb(cond),
  f_i = 10000^(-i / half)."""
  half = net.channels // 2
  freqs = np.exp(-np.log(10_000) * np.arange(half, dtype=np.float32) / half).astype(np.float32)
  angles = jnp.outer(net.time_scale * c_noise, freqs)
  emb = jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)
  features = net.channels * net.emb_mult
  emb = nn.Dense(features, name='time_embed_2')(nn.silu(nn.Dense(features, name='time_embed_0')(emb)))
  if net.num_classes:
    cond = drop_labels(net, cond, net.label_dropout, train)
    table = nn.Embed(net.num_classes, features, name='label_emb')
    emb = emb + jnp.where((cond >= 0)[:, None], table(jnp.maximum(cond, 0)), 0.0)  # a label < 0: no label
  return emb


def unet(net, x, c_noise, cond, train, guidance):
  """UNetModel.forward on the fields of `net` (an ADM with layout='guided_diffusion', inside its compact call)."""
  _check(net, x, cond, guidance)
  emb = _embedding(net, c_noise, cond, train)
  levels = len(net.channel_mult)
  block = lambda features, name, **kw: ResBlock(features, net.adaptive_norm == 'scale_shift', dropout=net.dropout,
                                                name=name, **kw)
  attend = lambda name: AttentionBlock(net.head_dim, net.attention_kernel, name=name)
  h = _conv(net.channels * net.channel_mult[0], 'input_blocks_0_0')(x.astype(jnp.float32))
  hs, index, res = [h], 1, x.shape[1]
  for level, mult in enumerate(net.channel_mult):
    for _ in range(net.num_res_blocks):
      h = block(net.channels * mult, f'input_blocks_{index}_0')(h, emb, train)
      if res in net.attn_resolutions:
        h = attend(f'input_blocks_{index}_1')(h)
      hs.append(h)
      index += 1
    if level != levels - 1:
      name = f'input_blocks_{index}_0'
      if net.resblock_updown:
        h = block(h.shape[-1], name, down=True)(h, emb, train)
      else:
        h = Downsample(name=name)(h)
      hs.append(h)
      index += 1
      res //= 2
  h = block(h.shape[-1], 'middle_block_0')(h, emb, train)
  h = attend('middle_block_1')(h)
  h = block(h.shape[-1], 'middle_block_2')(h, emb, train)
  index = 0
  for level, mult in reversed(list(enumerate(net.channel_mult))):
    for i in range(net.num_res_blocks + 1):
      h = jnp.concatenate([h, hs.pop()], axis=-1)
      h = block(net.channels * mult, f'output_blocks_{index}_0')(h, emb, train)
      sub = 1
      if res in net.attn_resolutions:
        h = attend(f'output_blocks_{index}_1')(h)
        sub = 2
      if level and i == net.num_res_blocks:
        name = f'output_blocks_{index}_{sub}'
        if net.resblock_updown:
          h = block(h.shape[-1], name, up=True)(h, emb, train)
        else:
          h = Upsample(name=name)(h)
        res *= 2
      index += 1
  h = nn.silu(_norm('out_0')(h))
  return _conv(x.shape[-1], 'out_2', kernel_init=nn.initializers.zeros)(h)
