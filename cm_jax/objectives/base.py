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
  """
  loss: Callable[..., tuple[jax.Array, dict]]
  kind: str
  init_extra: Callable[[jax.Array], PyTree] = lambda rng: {}
  target_rate: Optional[Callable[[jax.Array], jax.Array]] = None


def network(model, params, cond=None, dropout_rng=None):
  """F(x_in, c_noise) with parameters, labels and dropout bound; dropout is on iff a key is given."""
  train = dropout_rng is not None
  rngs = {'dropout': dropout_rng} if train else None
  return lambda x, c_noise: model.apply({'params': params}, x, c_noise, cond, train=train, rngs=rngs)


def labels(batch, model_config):
  """The conditioning labels of a batch, or None for an unconditional model."""
  return batch['label'] if model_config.num_classes > 0 else None
