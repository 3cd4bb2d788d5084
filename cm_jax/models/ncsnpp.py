"""DDPM++ and NCSN++ (Song et al. 2021), the CIFAR-10 networks of EDM, CM, iCT, ECT and sCM, as configured in EDM.

DDPM++: positional embedding of c_noise (128 sinusoids), (1, 1) resampling filter, plain encoder.
NCSN++: Fourier embedding (256 features, scale 16), (1, 3, 3, 1) filter, residual image-pyramid encoder.
Both: BigGAN-style residual up/down blocks, attention at 16x16, skip rescaling by 1/sqrt(2), dropout.
layout='edm' is EDM's own SongUNet, named as its state dicts (models/edm.py): EDM's released pickles load into it
(models/checkpoints.py).
"""

import functools
from collections.abc import Sequence

import flax.linen as nn
import numpy as np

from cm_jax.models import edm
from cm_jax.models.blocks import remat_block, unet
from cm_jax.models.layers import Conditioned


class NCSNpp(Conditioned):
  """DDPM++ / NCSN++: F(x, c_noise, cond) with the shape of x. The defaults are CIFAR-10 DDPM++ (55.7M parameters).

  The conditioning fields are layers.Conditioned's (time_embedding 'positional' in DDPM++, 'fourier' with
  time_scale 16 in NCSN++; second_time: the interval t - r, in the 'cm_jax' layout embedded like c_noise by a
  mapping of its own and added, in the 'edm' layout as the MeanFlow PyTorch port's SongUNet: its sinusoids joined to
  c_noise's before map_layer0, models/edm.py).

  Attributes:
    channels: base width; level i has channels * channel_mult[i] channels.
    channel_mult: width multiplier per resolution level.
    num_res_blocks: residual blocks per encoder level (decoder levels have one more).
    attn_resolutions: spatial sizes with self-attention (encoder blocks, last decoder block of the level).
    dropout: dropout rate inside the residual blocks.
    noise_mult: sinusoid features = channels * noise_mult (1 in DDPM++, 2 in NCSN++).
    emb_mult: embedding width = channels * emb_mult.
    residual_input: NCSN++'s progressive 'residual' input pyramid in the encoder.
    resample_filter: FIR filter of the up/down blocks ((1, 1) DDPM++, (1, 3, 3, 1) NCSN++).
    adaptive_norm: 'shift' (DDPM++), 'scale_shift' or 'double' (sCM) conditioning of the blocks' second norm.
    dtype: compute dtype ('float32' or 'bfloat16'); parameters stay float32, the output is float32.
    norm: 'group' (GroupNorm) or 'nsln' (non-scaling LayerNorm, improved latent CT).
    remat: rematerialisation of the UNet blocks in the backward pass: '', 'block' or a jax.checkpoint_policies
      name (blocks.remat_block).
    attention_kernel: 'xla' or 'flash' (Pallas flash attention on TPU, with a forward-mode kernel for JVPs),
      models/attention.py.
    layout: 'cm_jax' (models/blocks.py) or 'edm': EDM's SongUNet, parameter for parameter (models/edm.py: its
      mapping, label and augmentation placement, fused residual encoder); with 'edm' the Fourier frequencies are a
      parameter (read from EDM's file) and guidance_embedding is unavailable; with second_time it is the MeanFlow
      port's SongUNet (Gsunshine/py-meanflow), named as its state dicts.
    augment_dim: EDM's augmentation-label input width (9 in its CIFAR-10 runs; 'edm' layout only); 0: none.
    decoder_type: EDM's decoder, 'standard' or 'skip' (progressive output; 'edm' layout only).
  """
  channels: int = 128
  channel_mult: Sequence[int] = (2, 2, 2)
  num_res_blocks: int = 4
  attn_resolutions: Sequence[int] = (16,)
  dropout: float = 0.1
  noise_mult: int = 1
  emb_mult: int = 4
  residual_input: bool = False
  resample_filter: Sequence[int] = (1, 1)
  adaptive_norm: str = 'shift'
  dtype: str = 'float32'
  norm: str = 'group'
  remat: str = ''
  attention_kernel: str = 'xla'
  layout: str = 'cm_jax'
  augment_dim: int = 0
  decoder_type: str = 'standard'

  @nn.compact
  def __call__(self, x, c_noise, cond=None, train=False, guidance=None, augment_labels=None, interval=None):
    """Maps x [B, H, W, C], c_noise [B], cond [B] int (< 0: no label) or None, guidance [B] or None (s = 1), EDM's
    augment_labels [B, augment_dim] or None (no augmentation) and interval [B] or None (the second time t - r,
    model.second_time; None: 0) to [B, H, W, C] (float32)."""
    self.check_second_time(interval, self.layout, layouts=('cm_jax', 'edm'))
    if self.layout == 'edm':
      return edm.song_unet(self, x, c_noise, cond, train, guidance, augment_labels, interval)
    if self.layout != 'cm_jax':
      raise ValueError(f"model.layout={self.layout!r}; expected 'cm_jax' or 'edm'.")
    if self.augment_dim or augment_labels is not None or self.decoder_type != 'standard':
      raise ValueError("model.augment_dim and model.decoder_type are options of model.layout='edm'.")
    eps = 1e-6
    block = functools.partial(
        remat_block(self.remat), attention_kernel=self.attention_kernel, dropout=self.dropout,
        skip_scale=np.sqrt(0.5), adaptive_norm=self.adaptive_norm,
        resample_filter=tuple(self.resample_filter), resample_proj=True, eps=eps, dtype=self.dtype, norm=self.norm)
    features, noise_features = self.channels * self.emb_mult, self.channels * self.noise_mult
    embed = self.embedding(features, noise_features, self.dtype)
    second = self.interval_embedding(interval, c_noise, features, noise_features, self.dtype)
    return unet(x, c_noise, cond, train, guidance, net=self, block=block, embed=lambda *a: embed(*a) + second,
                attention_blocks=lambda res: (self.num_res_blocks,) if res in self.attn_resolutions else (),
                residual_input=self.residual_input, resample_filter=tuple(self.resample_filter), eps=eps)
