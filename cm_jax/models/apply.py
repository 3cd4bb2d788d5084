"""Networks bound to their parameters, labels, guidance scale and dropout: how objectives and samplers call them."""

from typing import Any, Optional

import flax
import jax
import jax.numpy as jnp

from cm_jax.models import lora

NULL_LABEL = -1  # the unconditional label of every network (a label < 0 embeds as zero)


@flax.struct.dataclass
class TextCondition:
  """A text-to-image network's condition: the prompts' text-encoder states [B, L, D] (SDXL: with the pooled embedding
  [B, P] and the time ids [B, 6]), and those of the unconditional branch (the empty prompt, or a negative prompt)."""
  hidden_states: Any
  null_hidden_states: Any
  pooled: Optional[Any] = None
  null_pooled: Optional[Any] = None
  time_ids: Optional[Any] = None

  def null(self) -> 'TextCondition':
    """The unconditional branch as a condition of its own."""
    return self.replace(hidden_states=self.null_hidden_states, pooled=self.null_pooled)


def null_condition(cond):
  """The unconditional branch of `cond`: label -1 for class labels, the empty (negative) prompt for text."""
  return cond.null() if isinstance(cond, TextCondition) else jnp.full_like(cond, NULL_LABEL)


def takes_guidance(model) -> bool:
  """Whether the network has a guidance-scale input (model.guidance_embedding)."""
  return bool(getattr(model, 'guidance_embedding', False))


def takes_second_time(model) -> bool:
  """Whether the network has a second time input (model.second_time: the interval t - r of u(z_t, r, t))."""
  return bool(getattr(model, 'second_time', False))


def can_guide(model) -> bool:
  """Whether a network has the unconditional branch classifier-free guidance needs: a text-to-image network (the
  empty prompt), or labels trained with label dropout (model.label_dropout > 0), so that label -1 means "no label"."""
  if getattr(model, 'text_conditioned', False):
    return True
  return bool(getattr(model, 'num_classes', 0)) and getattr(model, 'label_dropout', 0.0) > 0


def guided(predict, cond, scale):
  """Classifier-free guidance of `predict(cond)` (an array or a tuple of them): u + s (c - u) with c = predict(cond)
  and u = predict(null_condition(cond)), s per example [B] or a scalar; `scale` None: predict(cond) alone."""
  conditional = predict(cond)
  if scale is None:
    return conditional
  unconditional = predict(null_condition(cond))
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
  the network then runs with the merged kernels or in LoRA's un-merged form (LoRAParams.merged). A network with a
  second time input (`takes_second_time`) is F(x_in, c_noise, interval=None).
  """
  train = dropout_rng is not None
  rngs = {'dropout': dropout_rng} if train else None
  extra = {'guidance': guidance} if takes_guidance(model) else {}
  if isinstance(params, lora.LoRAParams):
    if takes_second_time(model):
      raise ValueError('LoRA adapters on a network with a second time input (model.second_time) are not supported.')
    if params.merged:
      merged = lora.merge(params.base, (params.adapters, params.scale))
      return lambda x, c_noise: model.apply({'params': merged}, x, c_noise, cond, train=train, rngs=rngs, **extra)
    return lambda x, c_noise: lora.apply_unmerged(model, params, x, c_noise, cond, train=train, rngs=rngs, **extra)
  if takes_second_time(model):
    return lambda x, c_noise, interval=None: model.apply({'params': params}, x, c_noise, cond, train=train, rngs=rngs,
                                                         interval=interval, **extra)
  return lambda x, c_noise: model.apply({'params': params}, x, c_noise, cond, train=train, rngs=rngs, **extra)
