"""The seam between methods and the trainer: every method is an `Objective`."""

import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

PyTree = Any


def _init_network(model, rng, sample_input):
  """The network's parameters from model.init on one (x, c_noise, cond) example."""
  x, c_noise, cond = sample_input
  return model.init({'params': rng}, x, c_noise, cond)['params']


@dataclasses.dataclass(frozen=True)
class Objective:
  """A training method, as the trainer sees it.

  loss(params, extra, frozen, batch, rng, step) -> (scalar, metrics): a pure function of the traced step;
    `frozen` is a dict with 'target' (theta-, when target_rate is set) and 'teacher' (distillation) entries.
  sampler: how its models are sampled (sampling.Sampler: the sampler, its step counts and NFE).
  init_extra(rng) -> extra trained parameters ({} when the method has none).
  target_rate(step) -> mu of the target update theta- <- mu theta- + (1 - mu) theta; None keeps no target copy.
  feeds_guidance: the loss can give the network a per-example guidance scale, so a network with a guidance input
    (model.guidance_embedding) is fed; `make_objective` refuses such a network for an objective that cannot.
  teacher: the parameterisation ('edm', 'trigflow' or 'vp') in which the loss reads frozen['teacher']; None when it
    distils no teacher (train.load_teacher checks the teacher run's against it).
  init_params(model, rng, sample_input) -> the trained parameters at step 0 (default: the network's).
  sample_params(params, frozen) -> the network parameters its sampler uses (default: params; LoRA: the teacher
    merged with the adapters).
  finish(experiment, state, workdir): what a finished run of the method writes besides its checkpoint (the
    autoencoder exports itself); None: nothing.
  """
  loss: Callable[..., tuple[jax.Array, dict]]
  sampler: Any
  init_extra: Callable[[jax.Array], PyTree] = lambda rng: {}
  target_rate: Optional[Callable[[jax.Array], jax.Array]] = None
  feeds_guidance: bool = False
  teacher: Optional[str] = None
  init_params: Callable = _init_network
  sample_params: Callable = lambda params, frozen: params
  finish: Optional[Callable] = None


def labels(batch, model_config):
  """The conditioning labels of a batch, or None for an unconditional model."""
  return batch['label'] if model_config.num_classes > 0 else None


def sample_guidance(rng, guidance_scale, batch: int):
  """s ~ U[lo, hi] per example (s = lo when lo = hi): the guidance scales of a guided distillation batch."""
  lo, hi = guidance_scale
  return jax.random.uniform(rng, (batch,), minval=lo, maxval=hi) if lo < hi else jnp.full((batch,), lo)
