"""The train state pytree and its optimiser."""

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

PyTree = Any


@flax.struct.dataclass
class TrainState:
  """Everything a step changes. RNG is never stored: step k uses fold_in(PRNGKey(seed), k).

  params: the network theta; extra: other trained parameters (e.g. sCM's adaptive weighting network);
  target: theta- when the objective keeps an EMA target, else None; ema: sampling EMAs, one per configured rate.
  """
  step: jax.Array
  params: PyTree
  extra: PyTree
  opt_state: PyTree
  ema: tuple
  target: PyTree = None

  def trainable(self):
    return {'params': self.params, 'extra': self.extra}


def make_optimizer(optim_config) -> optax.GradientTransformation:
  """Gradient clipping (global norm, 0 = off), then L2 weight decay added to the gradient (weight_decay, 0 = off:
  PyTorch's coupled Adam / RAdam weight_decay), then Adam or RAdam with linear learning-rate warm-up."""
  c = optim_config
  lr = c.learning_rate
  if c.warmup_steps > 0:
    lr = optax.linear_schedule(0.0, c.learning_rate, c.warmup_steps)
  if c.name == 'adam':
    opt = optax.adam(lr, b1=c.b1, b2=c.b2, eps=c.eps)
  elif c.name == 'radam':
    opt = optax.radam(lr, b1=c.b1, b2=c.b2, eps=c.eps)
  else:
    raise ValueError(f"Unknown optim.name {c.name!r}; expected 'adam' or 'radam'.")
  weight_decay = float(c.get('weight_decay', 0.0))  # absent from configs written before the key
  if weight_decay < 0:
    raise ValueError(f'optim.weight_decay={weight_decay} must be >= 0.')
  if weight_decay > 0:
    opt = optax.chain(optax.add_decayed_weights(weight_decay), opt)
  if c.grad_clip > 0:
    return optax.chain(optax.clip_by_global_norm(c.grad_clip), opt)
  return opt


def create_state(rng, model, objective, tx, sample_input, num_ema: int) -> TrainState:
  """Initialises the trained parameters (objective.init_params: the network's, or LoRA adapters), extra parameters,
  optimiser state, EMA copies and the target (if any)."""
  rng_params, rng_extra = jax.random.split(rng)
  params = objective.init_params(model, rng_params, sample_input)
  extra = objective.init_extra(rng_extra)
  trainable = {'params': params, 'extra': extra}
  return TrainState(
      step=jnp.zeros((), jnp.int32), params=params, extra=extra, opt_state=tx.init(trainable),
      ema=tuple(params for _ in range(num_ema)),
      target=params if objective.target_rate is not None else None)

