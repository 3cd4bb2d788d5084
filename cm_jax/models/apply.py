"""Networks bound to their parameters, labels, guidance scale and dropout: how objectives and samplers call them."""

import jax
import jax.numpy as jnp

from cm_jax.models import lora

NULL_LABEL = -1  # the unconditional label of every network (a label < 0 embeds as zero)


def takes_guidance(model) -> bool:
  """Whether the network has a guidance-scale input (model.guidance_embedding)."""
  return bool(getattr(model, 'guidance_embedding', False))


def takes_second_time(model) -> bool:
  """Whether the network has a second time input (model.second_time: the interval t - r of u(z_t, r, t))."""
  return bool(getattr(model, 'second_time', False))


def can_guide(model) -> bool:
  """Whether a network has the unconditional branch classifier-free guidance needs: labels, trained with label
  dropout (model.label_dropout > 0), so that label -1 means "no label"."""
  return bool(getattr(model, 'num_classes', 0)) and getattr(model, 'label_dropout', 0.0) > 0


def guided(predict, cond, scale):
  """Classifier-free guidance of `predict(labels)` (an array or a tuple of them): u + s (c - u) with c = predict(cond)
  and u = predict(null labels), s per example [B] or a scalar; `scale` None: predict(cond) alone (one evaluation)."""
  conditional = predict(cond)
  if scale is None:
    return conditional
  unconditional = predict(jnp.full_like(cond, NULL_LABEL))
  s = jnp.asarray(scale)
  return jax.tree.map(lambda c, u: u + jnp.reshape(s, s.shape + (1,) * (c.ndim - s.ndim)) * (c - u),
                      conditional, unconditional)


def without_guidance(model):
  """The same network without its guidance input: how a guidance-input student's diffusion teacher is applied."""
  return model.clone(guidance_embedding=False) if takes_guidance(model) else model


def without_label_dropout(model):
  """The network with its training label dropout off, for a distillation student: it learns the teacher's output for
  the batch's labels, and a dropped label would pair "no label" with a conditional target (model.label_dropout is
  the teacher's setting)."""
  return model.clone(label_dropout=0.0) if getattr(model, 'label_dropout', 0.0) else model


def network(model, params, cond=None, dropout_rng=None, guidance=None):
  """F(x_in, c_noise) with parameters, labels, guidance scale and dropout bound; dropout is on iff a key is given.

  guidance: per-example guidance scale s [B] (or None); it reaches the model only when the model takes it
  (`takes_guidance`), other networks ignore it. `params` may be lora.LoRAParams (a frozen base with adapters):
  the network then runs in LoRA's un-merged form. A network with a second time input (`takes_second_time`) is
  F(x_in, c_noise, interval=None).
  """
  train = dropout_rng is not None
  rngs = {'dropout': dropout_rng} if train else None
  extra = {'guidance': guidance} if takes_guidance(model) else {}
  if isinstance(params, lora.LoRAParams):
    if takes_second_time(model):
      raise ValueError('LoRA adapters on a network with a second time input (model.second_time) are not supported.')
    return lambda x, c_noise: lora.apply_unmerged(model, params, x, c_noise, cond, train=train, rngs=rngs, **extra)
  if takes_second_time(model):
    return lambda x, c_noise, interval=None: model.apply({'params': params}, x, c_noise, cond, train=train, rngs=rngs,
                                                         interval=interval, **extra)
  return lambda x, c_noise: model.apply({'params': params}, x, c_noise, cond, train=train, rngs=rngs, **extra)
