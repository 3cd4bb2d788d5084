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
  """Gradient clipping (global norm, 0 = off) then Adam or RAdam with linear learning-rate warm-up."""
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
  if c.grad_clip > 0:
    return optax.chain(optax.clip_by_global_norm(c.grad_clip), opt)
  return opt


def create_state(rng, model, objective, tx, sample_input, num_ema: int) -> TrainState:
  """Initialises parameters, extra parameters, optimiser state, EMA copies and the target (if any)."""
  rng_params, rng_extra = jax.random.split(rng)
  x, c_noise, cond = sample_input
  params = model.init({'params': rng_params}, x, c_noise, cond)['params']
  extra = objective.init_extra(rng_extra)
  trainable = {'params': params, 'extra': extra}
  return TrainState(
      step=jnp.zeros((), jnp.int32), params=params, extra=extra, opt_state=tx.init(trainable),
      ema=tuple(params for _ in range(num_ema)),
      target=params if objective.target_rate is not None else None)


def ema_update(ema, new, rate):
  """ema <- rate ema + (1 - rate) new, leaf by leaf."""
  return jax.tree.map(lambda e, p: rate * e + (1.0 - rate) * p, ema, new)
