"""A residual MLP for 2-D toys and flat data [B, D]."""

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from cm_jax.models.layers import TimeEmbedding, pixel_norm


class MLPBlock(nn.Module):
  """Pre-norm residual block with the time embedding added: (x + F) / sqrt(2).

  F = Dense(Dropout(SiLU(ada(h)))),  h = Dense(SiLU(LN(x))),  ada = 'add': LN(h + Dense(SiLU(emb)));
  'double': LN(h) pnorm(s) + pnorm(b), (s, b) = Dense(SiLU(emb)) (sCM's adaptive double normalisation).
  """
  features: int
  dropout: float = 0.0
  adaptive_norm: str = 'add'

  @nn.compact
  def __call__(self, x, emb, train):
    """Maps x [B, features] and emb [B, E] to [B, features]."""
    h = nn.Dense(self.features, name='dense_0')(
        nn.silu(nn.LayerNorm(name='norm_0')(x)))
    if self.adaptive_norm == 'double':
      scale, shift = jnp.split(nn.Dense(2 * self.features, name='emb')(nn.silu(emb)), 2, axis=-1)
      h = nn.LayerNorm(name='norm_1')(h) * pixel_norm(scale) + pixel_norm(shift)
    else:
      h = nn.LayerNorm(name='norm_1')(h + nn.Dense(self.features, name='emb')(nn.silu(emb)))
    h = nn.silu(h)
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    h = nn.Dense(self.features, name='dense_1')(h)
    return (x + h) / np.sqrt(2)


class MLP(nn.Module):
  """Noise-conditional residual MLP: F(x, c_noise, cond) with the shape of x.

  Attributes:
    hidden: width of the residual stream and of the time embedding.
    depth: number of residual blocks.
    dropout: dropout rate inside the residual blocks.
    num_classes: number of class labels; 0 for an unconditional model.
    time_embedding: 'fourier' or 'positional' embedding of c_noise.
    time_scale: Fourier frequency std, or positional multiplier of c_noise.
    adaptive_norm: 'add' (LN(h + b(t))) or 'double' (LN(h) pnorm(s(t)) + pnorm(b(t)), sCM).
  """
  hidden: int = 256
  depth: int = 4
  dropout: float = 0.0
  num_classes: int = 0
  time_embedding: str = 'positional'
  time_scale: float = 1000.0
  adaptive_norm: str = 'add'

  @nn.compact
  def __call__(self, x, c_noise, cond=None, train=False):
    """Maps x [B, ...] (flattened inside), c_noise [B], cond [B] int or None to x's shape."""
    if self.adaptive_norm not in ('add', 'double'):
      raise ValueError(f"Unknown adaptive_norm {self.adaptive_norm!r}; known: ['add', 'double'].")
    shape = x.shape
    x = x.reshape(shape[0], -1)
    emb = TimeEmbedding(self.hidden, self.time_embedding, self.time_scale,
                        self.num_classes, name='time_embed')(c_noise, cond)
    h = nn.Dense(self.hidden, name='dense_in')(x)
    for i in range(self.depth):
      h = MLPBlock(self.hidden, self.dropout, self.adaptive_norm, name=f'block_{i}')(h, emb, train)
    h = nn.silu(nn.LayerNorm(name='norm_out')(h))
    out = nn.Dense(x.shape[-1], kernel_init=nn.initializers.zeros,
                   name='dense_out')(h)
    return out.reshape(shape)
