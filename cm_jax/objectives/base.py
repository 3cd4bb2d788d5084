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

  loss(params, extra, inputs, batch, rng, step) -> (scalar, metrics): a pure function of the traced step;
    `inputs` is a dict with 'target' (theta-, when target_rate is set) and 'teacher' (distillation) entries.
  sampler: how its models are sampled (sampling.Sampler: the sampler, its step counts and NFE).
  init_extra(rng) -> extra trained parameters ({} when the method has none).
  target_rate(step) -> mu of the target update theta- <- mu theta- + (1 - mu) theta; None keeps no target copy.
  feeds_guidance: the loss can give the network a per-example guidance scale, so a network with a guidance input
    (model.guidance_embedding) is fed; `make_objective` refuses such a network for an objective that cannot.
  distils: the parameterisation ('edm', 'trigflow' or 'vp') in which the loss reads inputs['teacher'], the teacher
    run's parameters; None when it distils no teacher (experiment.load_teacher checks the teacher run against it).
  init_params(model, rng, sample_input) -> the trained parameters at step 0 (default: the network's).
  sample_params(params, inputs) -> the network parameters its sampler uses (default: params; LoRA: the teacher
    merged with the adapters).
  inputs(abstract=False) -> what the loss reads from `inputs` besides target and teacher ({} by default; LPIPS: its
    network's weights): loaded by the trainer before it compiles the step and passed in replicated, like the teacher.
  finish(experiment, state, workdir) -> {name: images}: what a finished run of the method writes besides its
    checkpoint (the autoencoder exports itself), returning images the quality table scores (its held-out
    reconstructions); None: nothing.
  """
  loss: Callable[..., tuple[jax.Array, dict]]
  sampler: Any
  init_extra: Callable[[jax.Array], PyTree] = lambda rng: {}
  target_rate: Optional[Callable[[jax.Array], jax.Array]] = None
  feeds_guidance: bool = False
  distils: Optional[str] = None
  init_params: Callable = _init_network
  sample_params: Callable = lambda params, inputs: params
  inputs: Callable = lambda abstract=False: {}
  finish: Optional[Callable] = None


def check_keys(objective_config, required, optional=frozenset()) -> None:
  """Every config.objective key is one the method reads: `required` ones all present, nothing outside `optional`."""
  got = set(objective_config.keys())
  unknown, missing = got - set(required) - set(optional), set(required) - got
  if unknown or missing:
    raise ValueError(f'objective.name={objective_config.name!r}: unknown objective key(s) {sorted(unknown)}, '
                     f'missing objective key(s) {sorted(missing)}.')


def labels(batch, model_config):
  """The condition of a batch: its TextCondition (a text-to-image run), class labels, or None (unconditional)."""
  if 'text' in batch:
    return batch['text']
  return batch['label'] if model_config.get('num_classes', 0) > 0 else None


def sample_guidance(rng, guidance_scale, batch: int):
  """s ~ U[lo, hi] per example (s = lo when lo = hi): the guidance scales of a guided distillation batch."""
  lo, hi = guidance_scale
  return jax.random.uniform(rng, (batch,), minval=lo, maxval=hi) if lo < hi else jnp.full((batch,), lo)
