"""The train step: one optimiser step of an objective's loss, with its target and EMA updates; pure, jit-compiled
once by experiment.Experiment.train_step with the state's and the batch's shardings."""

import jax
import jax.numpy as jnp
import optax

from cm_jax.state import TrainState


SPACE_STREAM = 7  # fold_in(step key, SPACE_STREAM): the randomness of the data space (a posterior sample)


def make_train_step(objective, space, tx, ema_rates, seed: int, skip_nonfinite: bool, mesh):
  """train_step(state, batch, frozen) -> (state, metrics): one optimiser step, target and EMA updates.

  `frozen` holds what the step reads but does not train: 'teacher' (parameters or None), 'space' (the latent
  space's autoencoder parameters or None) and 'objective' (the objective's own inputs, e.g. LPIPS's weights); the
  batch passes through `space.prepare` first. Step k draws its
  randomness from fold_in(PRNGKey(seed), k). With `skip_nonfinite`, a step whose loss, gradient or updated parameters
  are not finite leaves the state unchanged except for the step counter (counted in the metrics). The mesh is the
  abstract mesh while the step is traced (couplings.py and the flash-attention kernels shard by it).
  """
  base_key = jax.random.PRNGKey(seed)

  def train_step(state: TrainState, batch, frozen):
    rng = jax.random.fold_in(base_key, state.step)
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      batch = space.prepare(frozen['space'], batch, jax.random.fold_in(rng, SPACE_STREAM))
      inputs = {'target': state.target, 'teacher': frozen['teacher'], **frozen['objective']}

      def loss_fn(trainable):
        return objective.loss(trainable['params'], trainable['extra'], inputs, batch, rng, state.step)

      (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.trainable())
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.trainable())
    trainable = optax.apply_updates(state.trainable(), updates)
    params = trainable['params']
    new = state.replace(
        step=state.step + 1, params=params, extra=trainable['extra'], opt_state=opt_state,
        ema=tuple(optax.incremental_update(params, e, 1.0 - r) for e, r in zip(state.ema, ema_rates)),  # r e + (1-r) p
        target=(None if objective.target_rate is None
                else optax.incremental_update(params, state.target, 1.0 - objective.target_rate(state.step))))
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(optax.tree.norm(params))
    if skip_nonfinite:
      keep = lambda n, o: jnp.where(finite, n, o)
      new = jax.tree.map(keep, new.replace(step=state.step), state).replace(step=state.step + 1)
    metrics = dict(metrics, grad_norm=grad_norm, nonfinite=1.0 - finite.astype(jnp.float32))
    return new, metrics

  return train_step
