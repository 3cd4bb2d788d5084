"""Layers shared by all networks: noise, label, guidance and second-time embeddings, the feature and adaptive
normalisations, the pixel norm."""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

ADAPTIVE_NORMS = ('shift', 'scale_shift', 'double')
INTERVAL_INITS = ('normal', 'zeros')  # model.interval_init
NORMS = ('group', 'nsln')  # the feature normalisations of the convolutional networks (model.norm)
# s is embedded as sinusoids of GUIDANCE_SCALE * s (as LCM embeds its guidance weight: sinusoids of 1000 w).
GUIDANCE_SCALE = 1000.0


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


def check_condition(num_classes: int, guidance_input: bool, cond, guidance) -> None:
  """cond is given if and only if the network has labels; a guidance scale only to one with a guidance input."""
  if (cond is None) != (num_classes == 0):
    raise ValueError(f'cond must be given if and only if model.num_classes > 0; num_classes={num_classes}, '
                     f'cond is {"None" if cond is None else "given"}.')
  if guidance is not None and not guidance_input:
    raise ValueError('A guidance scale was given to a network without a guidance input '
                     '(model.guidance_embedding=False).')


def drop_labels(module: nn.Module, cond, rate: float, train: bool):
  """cond with each label replaced by -1 ("no label") with probability `rate` in training (the 'dropout' rng)."""
  if not train or rate <= 0:
    return cond
  return jnp.where(jax.random.bernoulli(module.make_rng('dropout'), 1.0 - rate, cond.shape), cond, -1)


class NoiseLabelEmbedding(nn.Module):
  """emb = Dense(SiLU(Dense(sinusoids(c_noise)))) + Dense(onehot(cond)) + Dense_0(sinusoids(1000 s)) (EDM's mapping).

  A label < 0 embeds as zero: the unconditional branch of classifier-free guidance. With label_dropout p, training
  replaces each label by "none" with probability p, so one network learns both branches.
  With `guidance`, the guidance scale s [B] (None: s = 1) is embedded like the noise level through its own dense
  layer, zero-initialised: a freshly initialised guidance input changes nothing, so a student that starts from an
  unguided teacher starts as that teacher. The paper networks apply SiLU to emb; the UNet and MLP blocks do.
  Networks build it from their shared fields (Conditioned.embedding).
  """
  features: int
  kind: str  # 'fourier' or 'positional'
  scale: float  # Fourier frequency std, or positional multiplier of c_noise
  num_classes: int = 0
  label_dropout: float = 0.0
  guidance: bool = False
  noise_features: int = 0  # sinusoids of c_noise and of s; 0: `features`
  zero_init: bool = False  # dense_1 starts at zero (kernel and bias): a fresh embedding is 0 for every input
  dtype: Any = None  # compute dtype; None: that of the inputs and parameters

  @nn.compact
  def __call__(self, c_noise, cond=None, train=False, guidance=None):
    """Maps c_noise [B], cond [B] int (or None) and guidance [B] (or None) to [B, features]."""
    if self.kind not in _NOISE_EMBEDDINGS:
      raise ValueError(f'Unknown model.time_embedding {self.kind!r}; known: {sorted(_NOISE_EMBEDDINGS)}.')
    check_condition(self.num_classes, self.guidance, cond, guidance)
    noise_features = self.noise_features or self.features
    emb = _NOISE_EMBEDDINGS[self.kind](noise_features, self.scale, name='sinusoids')(c_noise)
    emb = nn.silu(nn.Dense(self.features, dtype=self.dtype, name='dense_0')(emb))
    kernel_init = nn.initializers.zeros if self.zero_init else nn.linear.default_kernel_init
    emb = nn.Dense(self.features, kernel_init=kernel_init, dtype=self.dtype, name='dense_1')(emb)
    if self.num_classes:
      onehot = jax.nn.one_hot(drop_labels(self, cond, self.label_dropout, train), self.num_classes)  # < 0: zeros
      emb = emb + nn.Dense(self.features, use_bias=False, dtype=self.dtype, name='label')(onehot)
    if self.guidance:
      s = jnp.ones_like(c_noise) if guidance is None else jnp.broadcast_to(guidance, c_noise.shape)
      sinusoids = PositionalEmbedding(noise_features, GUIDANCE_SCALE, name='guidance_sinusoids')(s)
      emb = emb + nn.Dense(self.features, kernel_init=nn.initializers.zeros, dtype=self.dtype,
                           name='guidance')(sinusoids)
    return emb


class Conditioned(nn.Module):
  """What every network reads besides x: the fields of its conditioning on c_noise, class labels, a guidance scale
  and a second time, shared by the MLP, DDPM++ / NCSN++, ADM (and the UNet) and DiT, and their embeddings.

  Attributes:
    num_classes: number of class labels; 0 for an unconditional model.
    label_dropout: probability of dropping a training label, so the network also learns the unconditional
      F(x, c_noise, -1) that classifier-free guidance needs (a label < 0 is "no label").
    guidance_embedding: a guidance-scale input s, embedded like c_noise (sCD / LCM students of a guided teacher).
    time_embedding: 'positional' or 'fourier' embedding of c_noise (and of the second time).
    time_scale: positional multiplier of c_noise, or Fourier frequency std (the second time's too).
    second_time: a second time input, the interval h = t - r of a two-time network u(z_t, r, t) (MeanFlow's
      (t, t - r) conditioning): h [B] is embedded like c_noise (time_embedding, time_scale, the same widths) by its
      own embedding 'interval_embed' and added to the time embedding (h = 0 when not given), as the official
      MeanFlow DiT sums two timestep embedders; NCSNpp's 'edm' layout embeds it as the MeanFlow PyTorch port's
      SongUNet does instead (models/edm.py).
    interval_init: the interval embedding's initialisation: 'normal' (its dense layers as the time embedding's:
      lecun-normal kernels, the official MeanFlow's from-scratch setting) or 'zeros' (its last layer zero: a fresh
      interval input changes nothing, so a two-time student initialised from a one-time flow-matching teacher,
      config.teacher.init, starts as that teacher; in NCSNpp's 'edm' layout map_layer0's rows of h start at zero).
  """
  num_classes: int = 0
  label_dropout: float = 0.0
  guidance_embedding: bool = False
  time_embedding: str = 'positional'
  time_scale: float = 1.0
  second_time: bool = False
  interval_init: str = 'normal'

  def embedding(self, features: int, noise_features: int = 0, dtype=None, name: str = 'embed'):
    """The NoiseLabelEmbedding of these fields (called inside the network's compact call)."""
    return NoiseLabelEmbedding(features=features, kind=self.time_embedding, scale=self.time_scale,
                               num_classes=self.num_classes, label_dropout=self.label_dropout,
                               guidance=self.guidance_embedding, noise_features=noise_features, dtype=dtype,
                               name=name)

  def check_second_time(self, interval, layout: str = 'cm_jax', layouts: tuple = ('cm_jax',)) -> None:
    """An interval only to a network with model.second_time, and that only in the layouts with a second time input
    (cm_jax's own; NCSNpp's 'edm' too, as the MeanFlow port extends EDM's SongUNet; the other layouts of released
    weights, EDM's DhariwalUNet and guided-diffusion's UNet, have none)."""
    if interval is not None and not self.second_time:
      raise ValueError('A second time (t - r) was given to a network without a second time input '
                       '(set model.second_time=True).')
    if self.second_time and layout not in layouts:
      raise ValueError(f"model.second_time=True is an option of model.layout={' or '.join(map(repr, layouts))}; "
                       f'model.layout={layout!r} has no second time input.')

  def interval_input(self, interval, c_noise):
    """The second time h [B] of a network with model.second_time: interval [B] (None: 0), model.interval_init
    checked."""
    if self.interval_init not in INTERVAL_INITS:
      raise ValueError(f'model.interval_init={self.interval_init!r}; expected one of {INTERVAL_INITS}.')
    return jnp.zeros_like(c_noise) if interval is None else jnp.broadcast_to(interval, c_noise.shape)

  def interval_embedding(self, interval, c_noise, features: int, noise_features: int = 0, dtype=None):
    """emb(h) [B, features] of the second time h = interval [B] (None: 0) by 'interval_embed' with model.second_time,
    else 0 (called inside the network's compact call; an interval given to a one-time network raises)."""
    self.check_second_time(interval)
    if not self.second_time:
      return 0.0
    return NoiseLabelEmbedding(features=features, kind=self.time_embedding, scale=self.time_scale,
                               noise_features=noise_features, zero_init=self.interval_init == 'zeros', dtype=dtype,
                               name='interval_embed')(self.interval_input(interval, c_noise))


def adaptive_norm(mode, norm, h, emb, dtype=None):
  """Noise-conditional normalisation of h [B, ..., C] with (s, b) = Dense(emb), the layer named 'affine':

  'shift': norm(h + b) (DDPM++);  'scale_shift': norm(h) (1 + s) + b (ADM, FiLM);
  'double': norm(h) pnorm(s) + pnorm(b) (sCM's adaptive double normalisation).
  """
  if mode not in ADAPTIVE_NORMS:
    raise ValueError(f'model.adaptive_norm={mode!r}; expected one of {ADAPTIVE_NORMS}.')
  features = h.shape[-1]
  params = nn.Dense(features * (1 if mode == 'shift' else 2), dtype=dtype, name='affine')(emb)
  params = jnp.reshape(params, params.shape[:1] + (1,) * (h.ndim - 2) + params.shape[1:])
  if mode == 'shift':
    return norm(h + params)
  scale, shift = jnp.split(params, 2, axis=-1)
  if mode == 'double':
    return norm(h) * pixel_norm(scale) + pixel_norm(shift)
  return norm(h) * (1 + scale) + shift


def pixel_norm(x, eps=1e-8):
  """x / RMS(x) over the last (channel) axis: sCM's pnorm, unit mean square per position."""
  return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps)


def group_norm(channels: int, eps: float = 1e-6, dtype=None, name=None) -> nn.GroupNorm:
  """GroupNorm with min(32, channels // 4) groups, lowered until it divides `channels`."""
  groups = max(1, min(32, channels // 4))
  while channels % groups:
    groups -= 1
  return nn.GroupNorm(num_groups=groups, epsilon=eps, dtype=dtype, name=name)


def feature_norm(kind: str, channels: int, eps: float = 1e-6, dtype=None, name=None) -> nn.Module:
  """The normalisation of a convolutional network's features [B, H, W, C] (model.norm):

  'group': `group_norm`; 'nsln': non-scaling LayerNorm (improved latent CT), y = (x - mean) / sqrt(var + eps) + b
  with the statistics over all of one sample's features (H, W, C), a trained per-channel bias b and no scale.
  """
  if kind == 'group':
    return group_norm(channels, eps, dtype, name)
  if kind == 'nsln':
    return nn.GroupNorm(num_groups=1, epsilon=eps, use_scale=False, dtype=dtype, name=name)
  raise ValueError(f'model.norm={kind!r}; expected one of {NORMS}.')
