"""A small UNet for tests and CPU runs: the ADM stack (models/blocks.py) with small defaults."""

from collections.abc import Sequence

from cm_jax.models.adm import ADM


class UNet(ADM):
  """ADM (EDM's UNet blocks, adaptive normalisation, attention) with defaults for small images: unconditional, no
  dropout, three levels, attention at 16x16 and the positional embedding of 1000 c_noise. Every ADM field applies."""
  channels: int = 64
  channel_mult: Sequence[int] = (1, 2, 2)
  num_res_blocks: int = 2
  attn_resolutions: Sequence[int] = (16,)
  dropout: float = 0.0
  num_classes: int = 0
  time_scale: float = 1000.0
