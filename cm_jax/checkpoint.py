"""Orbax checkpoints of the train state and the data position.

Each step directory holds two items: 'state' (the TrainState pytree, restored onto the CURRENT mesh's
shardings, so a run may resume on another topology) and 'data' (JSON: the data position, i.e. the next
batch number, and the data seed). Saves are asynchronous; Orbax writes into a temporary directory and
renames it when complete, so an interrupted save is never listed as a step. A step whose files are
unreadable is skipped with a warning naming it, and the newest readable one is used.
"""

from absl import logging
import orbax.checkpoint as ocp
from etils import epath


class CheckpointError(RuntimeError):
  """A checkpoint directory exists but no step in it can be restored."""


class Checkpointer:
  """A CheckpointManager with the cm_jax items, created under `workdir/checkpoints`."""

  def __init__(self, workdir, max_to_keep: int = 3, save_every: int = 1000, async_save: bool = True):
    self.directory = epath.Path(workdir) / 'checkpoints'
    self.save_every = save_every
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, save_interval_steps=save_every,
        enable_async_checkpointing=async_save, create=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=('state', 'data'))

  def steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self):
    return self._manager.latest_step()

  def should_save(self, step: int) -> bool:
    """True at save intervals and when a preemption signal has reached this step on every process."""
    return step % self.save_every == 0 or self._manager.reached_preemption(step)

  def reached_preemption(self, step: int) -> bool:
    return self._manager.reached_preemption(step)

  def save(self, step: int, state, data_position: dict, force: bool = False) -> bool:
    """Starts an (async) save of the state and data position at `step`."""
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_position))
    return self._manager.save(step, args=args, force=force)

  def restore(self, abstract_state, step=None):
    """Restores (state, data_position) at `step` (default: the newest readable step).

    `abstract_state` is a pytree of jax.ShapeDtypeStruct with shardings: the arrays come back sharded like it.
    """
    candidates = [step] if step is not None else sorted(self.steps(), reverse=True)
    errors = []
    for s in candidates:
      try:
        restored = self._manager.restore(s, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
        return restored.state, restored.data
      except Exception as e:  # pylint: disable=broad-except
        logging.warning('Skipping unreadable checkpoint %s: %s', self.directory / str(s), e)
        errors.append(f'step {s}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}')
    raise CheckpointError(f'No readable checkpoint in {self.directory} (tried {"; ".join(errors)}). '
                          'Remove the directory to start afresh, or point --workdir elsewhere.')

  def wait(self):
    self._manager.wait_until_finished()

  def close(self):
    self._manager.close()
