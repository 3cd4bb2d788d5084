"""The ADM UNet (Dhariwal and Nichol 2021) as retrained in EDM: the class-conditional ImageNet-64 network of EDM,
CM and iCT (and of ECT and sCD's teachers at 64x64). layout='edm' is EDM's own DhariwalUNet, named as its state dicts
(models/edm.py): EDM's released pickles load into it (models/checkpoints.py)."""

import functools
from collections.abc import Sequence

import flax.linen as nn

from cm_jax.models import edm
from cm_jax.models import guided_diffusion
from cm_jax.models.blocks import remat_block, unet
from cm_jax.models.layers import Conditioned


class ADM(Conditioned):
  """ADM: F(x, c_noise, cond) with the shape of x. The defaults are EDM's ImageNet-64 configuration.

  The conditioning fields are layers.Conditioned's (num_classes 1000 here: ImageNet; channels sinusoids of c_noise;
  second_time: the interval t - r embedded like c_noise and added, 'cm_jax' layout only).

  Attributes:
    channels: base width; level i has channels * channel_mult[i] channels.
    channel_mult: width multiplier per resolution level.
    num_res_blocks: residual blocks per encoder level (decoder levels have one more).
    attn_resolutions: spatial sizes whose blocks (all of them) have self-attention.
    head_dim: channels per attention head.
    dropout: dropout rate inside the residual blocks.
    emb_mult: embedding width = channels * emb_mult.
    adaptive_norm: 'scale_shift' (ADM), 'shift' or 'double' (sCM) conditioning of the blocks' second norm.
    dtype: compute dtype ('float32' or 'bfloat16'); parameters stay float32, the output is float32.
    norm: 'group' (GroupNorm) or 'nsln' (non-scaling LayerNorm, improved latent CT).
    remat: rematerialisation of the UNet blocks in the backward pass: '', 'block' or a jax.checkpoint_policies
      name (blocks.remat_block).
    attention_kernel: 'xla' or 'flash' (Pallas flash attention on TPU, with a forward-mode kernel for JVPs),
      models/attention.py.
    layout: 'cm_jax' (models/blocks.py), 'edm': EDM's DhariwalUNet, parameter for parameter (models/edm.py: its
      augmentation input, a first conv of channels * channel_mult[0], no attention below head_dim channels; the
      positional embedding only, no guidance_embedding), or 'guided_diffusion': the UNet of the CM paper's
      releases (models/guided_diffusion.py; time_scale 1000 is the CM code's 250 ln sigma).
    resblock_updown: guided-diffusion's resampling residual blocks ('guided_diffusion' layout only; False: a
      stride-2 conv down and a nearest-neighbour conv up).
    augment_dim: EDM's augmentation-label input width ('edm' layout only); 0: none.
  """
  channels: int = 192
  channel_mult: Sequence[int] = (1, 2, 3, 4)
  num_res_blocks: int = 3
  attn_resolutions: Sequence[int] = (32, 16, 8)
  head_dim: int = 64
  dropout: float = 0.1
  num_classes: int = 1000
  emb_mult: int = 4
  adaptive_norm: str = 'scale_shift'
  dtype: str = 'float32'
  norm: str = 'group'
  remat: str = ''
  attention_kernel: str = 'xla'
  layout: str = 'cm_jax'
  augment_dim: int = 0
  resblock_updown: bool = False

  @nn.compact
  def __call__(self, x, c_noise, cond=None, train=False, guidance=None, augment_labels=None, interval=None):
    """Maps x [B, H, W, C], c_noise [B], cond [B] int (< 0: no label) or None, guidance [B] or None (s = 1), EDM's
    augment_labels [B, augment_dim] or None (no augmentation) and interval [B] or None (the second time t - r,
    model.second_time; None: 0) to [B, H, W, C] (float32)."""
    self.check_second_time(interval, self.layout)
    if self.layout == 'edm':
      return edm.dhariwal_unet(self, x, c_noise, cond, train, guidance, augment_labels)
    if self.resblock_updown and self.layout != 'guided_diffusion':
      raise ValueError("model.resblock_updown is an option of model.layout='guided_diffusion'.")
    if self.layout == 'guided_diffusion' and augment_labels is None:
      return guided_diffusion.unet(self, x, c_noise, cond, train, guidance)
    if self.layout != 'cm_jax':
      raise ValueError(f"model.layout={self.layout!r}; expected 'cm_jax', 'edm' or 'guided_diffusion' (which has "
                       'no augment_labels).')
    if self.augment_dim or augment_labels is not None:
      raise ValueError("model.augment_dim is an option of model.layout='edm'.")
    block = functools.partial(remat_block(self.remat), head_dim=self.head_dim, attention_kernel=self.attention_kernel,
                              dropout=self.dropout,
                              adaptive_norm=self.adaptive_norm, dtype=self.dtype, norm=self.norm)
    features = self.channels * self.emb_mult
    embed = self.embedding(features, self.channels, self.dtype)
    second = self.interval_embedding(interval, c_noise, features, self.channels, self.dtype)
    return unet(x, c_noise, cond, train, guidance, net=self, block=block, embed=lambda *a: embed(*a) + second,
                attention_blocks=lambda res: range(self.num_res_blocks + 1) if res in self.attn_resolutions else ())
