"""sCM's adaptive weighting (Lu and Song 2024): a small learned network w_phi(t) trained jointly with the model."""

import dataclasses

import flax.linen as nn
import jax.numpy as jnp

from cm_jax.models.layers import PositionalEmbedding


class AdaptiveWeight(nn.Module):
  """w_phi(t) = Linear(PositionalEmbedding(1000 t)) with 128 features, zero-initialised (w = 0 at the start)."""

  @nn.compact
  def __call__(self, t):
    emb = PositionalEmbedding(128, scale=1000.0)(t)
    return nn.Dense(1, kernel_init=nn.initializers.zeros, name='dense')(emb)[:, 0]


@dataclasses.dataclass(frozen=True)
class AdaptiveWeighting:
  """Per sample L = exp(-w_phi(t)) L_t + w_phi(t) when enabled (phi: the objective's `extra`), else L_t.

  Minimising over w gives w = ln L_t: the learned weighting equalises the loss across t.
  """
  enabled: bool

  def init(self, rng):
    """The parameters phi ({} when disabled)."""
    return AdaptiveWeight().init(rng, jnp.zeros((1,)))['params'] if self.enabled else {}

  def __call__(self, extra, t, per_sample):
    """(exp(-w) L_t + w, w) per sample, w = w_phi(t) (0 when disabled)."""
    w = AdaptiveWeight().apply({'params': extra}, t) if self.enabled else jnp.zeros_like(t)
    return jnp.exp(-w) * per_sample + w, w
