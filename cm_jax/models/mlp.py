"""A residual MLP for 2-D toys and flat data [B, D]."""

import flax.linen as nn
import numpy as np

from cm_jax.models.layers import Conditioned, adaptive_norm

MLP_NORMS = ('layer', 'nsln')


def layer_norm(kind: str, name: str) -> nn.LayerNorm:
  """LayerNorm over the features: 'layer' with scale and bias, 'nsln' non-scaling (bias only; improved latent CT)."""
  if kind not in MLP_NORMS:
    raise ValueError(f'model.norm={kind!r} for the MLP; expected one of {MLP_NORMS}.')
  return nn.LayerNorm(use_scale=kind == 'layer', name=name)


class MLPBlock(nn.Module):
  """Pre-norm residual block with the time embedding added: (x + F) / sqrt(2).

  F = Dense(Dropout(SiLU(ada(h, SiLU(emb))))),  h = Dense(SiLU(LN(x))),  ada: layers.adaptive_norm with LN
  ('shift' LN(h + b), 'scale_shift' LN(h) (1 + s) + b, 'double' LN(h) pnorm(s) + pnorm(b)).
  """
  features: int
  dropout: float = 0.0
  adaptive_norm: str = 'shift'
  norm: str = 'layer'

  @nn.compact
  def __call__(self, x, emb, train):
    """Maps x [B, features] and emb [B, E] to [B, features]."""
    h = nn.Dense(self.features, name='dense_0')(nn.silu(layer_norm(self.norm, 'norm_0')(x)))
    h = adaptive_norm(self.adaptive_norm, layer_norm(self.norm, 'norm_1'), h, nn.silu(emb))
    h = nn.silu(h)
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    h = nn.Dense(self.features, name='dense_1')(h)
    return (x + h) / np.sqrt(2)


class MLP(Conditioned):
  """Noise-conditional residual MLP: F(x, c_noise, cond) with the shape of x.

  Attributes:
    hidden: width of the residual stream and of the time embedding.
    depth: number of residual blocks.
    dropout: dropout rate inside the residual blocks.
    num_classes: number of class labels; 0 for an unconditional model.
    label_dropout: probability of dropping a training label, so the network also learns the unconditional
      F(x, c_noise, -1) that classifier-free guidance needs (a label < 0 is "no label").
    guidance_embedding: a guidance-scale input s, embedded like c_noise (sCD / LCM students of a guided teacher).
    time_embedding: 'fourier' or 'positional' embedding of c_noise.
    time_scale: Fourier frequency std, or positional multiplier of c_noise.
    second_time, interval_init: the second time input t - r and its embedding's initialisation (layers.Conditioned).
    adaptive_norm: 'shift' (LN(h + b(t))), 'scale_shift' (LN(h) (1 + s(t)) + b(t)) or 'double'
      (LN(h) pnorm(s(t)) + pnorm(b(t)), sCM).
    norm: 'layer' (LayerNorm) or 'nsln' (non-scaling LayerNorm: no scale parameter; improved latent CT).
  """
  hidden: int = 256
  depth: int = 4
  dropout: float = 0.0
  time_scale: float = 1000.0  # the conditioning fields are layers.Conditioned's
  adaptive_norm: str = 'shift'
  norm: str = 'layer'

  @nn.compact
  def __call__(self, x, c_noise, cond=None, train=False, guidance=None, interval=None):
    """Maps x [B, ...] (flattened inside), c_noise [B], cond [B] int (< 0: no label) or None, guidance [B] or None
    (s = 1), interval [B] or None (the second time t - r, model.second_time; None: 0) to x's shape."""
    shape = x.shape
    x = x.reshape(shape[0], -1)
    emb = self.embedding(self.hidden, name='time_embed')(c_noise, cond, train, guidance)
    emb = emb + self.interval_embedding(interval, c_noise, self.hidden)
    h = nn.Dense(self.hidden, name='dense_in')(x)
    for i in range(self.depth):
      h = MLPBlock(self.hidden, self.dropout, self.adaptive_norm, self.norm, name=f'block_{i}')(h, emb, train)
    h = nn.silu(layer_norm(self.norm, 'norm_out')(h))
    out = nn.Dense(x.shape[-1], kernel_init=nn.initializers.zeros,
                   name='dense_out')(h)
    return out.reshape(shape)
