"""Noise and class-label embeddings, and the pixel norm, shared by all networks."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


class FourierEmbedding(nn.Module):
  """Random Fourier features of the noise level (Tancik et al.; EDM's NCSN++).

  The frequencies are drawn once from N(0, scale^2) with a fixed numpy seed, so
  they are a constant of the network, not a parameter: nothing to train,
  nothing to checkpoint, identical on every host.
  """
  features: int
  scale: float = 16.0
  seed: int = 0

  def __call__(self, c_noise):
    """Returns [cos(2 pi f c), sin(2 pi f c)] with f ~ N(0, scale^2), fixed."""
    freqs = self.scale * np.random.default_rng(self.seed).standard_normal(
        self.features // 2)
    angles = jnp.outer(c_noise, 2 * np.pi * freqs.astype(np.float32))
    return jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)


class PositionalEmbedding(nn.Module):
  """Transformer sinusoidal embedding of `scale * c_noise` (DDPM, EDM)."""
  features: int
  scale: float = 1.0
  max_period: float = 10_000.0

  def __call__(self, c_noise):
    """Returns [cos(w_i s c), sin(w_i s c)] with w_i = (1/max_period)^(i/half)."""
    half = self.features // 2
    freqs = (1.0 / self.max_period) ** (np.arange(half, dtype=np.float32) / half)
    angles = jnp.outer(self.scale * c_noise, freqs)
    return jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)


_NOISE_EMBEDDINGS = {'fourier': FourierEmbedding,
                     'positional': PositionalEmbedding}


class TimeEmbedding(nn.Module):
  """Conditioning vector from the noise level and, optionally, a class label.

  emb = Dense(SiLU(Dense(sinusoids(c_noise)))) + Embed(cond)   (as in ADM).
  """
  features: int
  kind: str  # 'fourier' or 'positional'.
  scale: float  # Fourier frequency std, or positional multiplier of c_noise.
  num_classes: int = 0

  @nn.compact
  def __call__(self, c_noise, cond=None):
    """Maps c_noise [B] and cond [B] int (or None) to an embedding [B, features]."""
    if self.kind not in _NOISE_EMBEDDINGS:
      raise ValueError(f'Unknown time_embedding {self.kind!r}; '
                       f'known: {sorted(_NOISE_EMBEDDINGS)}.')
    if (cond is None) != (self.num_classes == 0):
      raise ValueError('cond must be given if and only if num_classes > 0; '
                       f'num_classes={self.num_classes}, cond is '
                       f'{"None" if cond is None else "given"}.')
    emb = _NOISE_EMBEDDINGS[self.kind](self.features, self.scale,
                                       name='sinusoids')(c_noise)
    emb = nn.Dense(self.features, name='dense_0')(emb)
    emb = nn.Dense(self.features, name='dense_1')(nn.silu(emb))
    if self.num_classes:
      emb = emb + nn.Embed(self.num_classes, self.features, name='label')(cond)
    return emb


def pixel_norm(x, eps=1e-8):
  """x / RMS(x) over the last (channel) axis: sCM's pnorm, unit mean square per position."""
  return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps)
