"""The seam between methods and the trainer: every method is an `Objective`."""

import dataclasses
from typing import Any, Callable, Optional

import jax

PyTree = Any


@dataclasses.dataclass(frozen=True)
class Objective:
  """A training method, as the trainer sees it.

  loss(params, extra, frozen, batch, rng, step) -> (scalar, metrics): a pure function of the traced step;
    `frozen` is a dict with 'target' (theta-, when target_rate is set) and 'teacher' (distillation) entries.
  init_extra(rng) -> extra trained parameters ({} when the method has none).
  target_rate(step) -> mu of the target update theta- <- mu theta- + (1 - mu) theta; None keeps no target copy.
  kind: 'diffusion' (sampled with the PF-ODE) or 'consistency' (sampled with f in 1 or few steps).
  feeds_guidance: the loss gives the network a per-example guidance scale, so the network must take one
    (model.guidance_embedding); `make_objective` checks the two agree.
  teacher: the parameterisation ('edm' or 'trigflow') in which the loss reads frozen['teacher']; None when it
    distils no teacher (train.load_teacher checks the teacher run's against it).
  """
  loss: Callable[..., tuple[jax.Array, dict]]
  kind: str
  init_extra: Callable[[jax.Array], PyTree] = lambda rng: {}
  target_rate: Optional[Callable[[jax.Array], jax.Array]] = None
  feeds_guidance: bool = False
  teacher: Optional[str] = None


def takes_guidance(model) -> bool:
  """Whether the network has a guidance-scale input (model.guidance_embedding)."""
  return bool(getattr(model, 'guidance_embedding', False))


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
  (`takes_guidance`), other networks ignore it.
  """
  train = dropout_rng is not None
  rngs = {'dropout': dropout_rng} if train else None
  extra = {'guidance': guidance} if takes_guidance(model) else {}
  return lambda x, c_noise: model.apply({'params': params}, x, c_noise, cond, train=train, rngs=rngs, **extra)


def labels(batch, model_config):
  """The conditioning labels of a batch, or None for an unconditional model."""
  return batch['label'] if model_config.num_classes > 0 else None
