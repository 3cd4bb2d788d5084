"""Orbax checkpoints of the train state and the data position.

Each step directory holds two items: 'state' (the TrainState pytree, restored onto the CURRENT mesh's
shardings, so a run may resume on another topology) and 'data' (JSON: the data position, i.e. the next
batch number, and the data seed). Saves are asynchronous; Orbax writes into a temporary directory and
renames it when complete, so a save interrupted by a killed process is never listed as a step (the run
that writes the directory deletes such leftovers when it starts). A step whose files are unreadable is
skipped with a warning naming it, and the newest readable one is used; the writing run then moves the
skipped steps aside (`<step>.unreadable-<time>`) so that it can save those steps again.
"""

import time

from absl import logging
import jax
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from cm_jax import sharding


class CheckpointError(RuntimeError):
  """A checkpoint directory exists but no step in it can be restored."""


class Checkpointer:
  """A CheckpointManager with the cm_jax items, created under `workdir/checkpoints`.

  `writer=True` for the one run that saves here (the trainer): it deletes the leftovers of interrupted
  saves and moves unreadable steps aside. Readers (a teacher, --mode=sample) leave the directory as it is.
  Every process of a multi-process run must create, save to and restore from its Checkpointer together.
  """

  def __init__(self, workdir, max_to_keep: int = 3, save_every: int = 1000, async_save: bool = True,
               writer: bool = False):
    workdir = epath.Path(workdir)
    # Orbax needs absolute paths; bucket paths (gs://...) already are.
    self.directory = (workdir if workdir.is_absolute() else workdir.absolute()) / 'checkpoints'
    self.save_every = save_every
    self._writer = writer
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, save_interval_steps=save_every,
        enable_async_checkpointing=async_save, create=True, cleanup_tmp_directories=writer)
    self._manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={'state': ocp.StandardCheckpointHandler(), 'data': ocp.JsonCheckpointHandler()})

  def steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self):
    return self._manager.latest_step()

  def should_save(self, step: int) -> bool:
    """True at the save interval (preemption saves are decided by distributed.PreemptionWatch)."""
    return step % self.save_every == 0

  def save(self, step: int, state, data_position: dict, force: bool = False) -> bool:
    """Starts an (async) save of the state and data position at `step`."""
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_position))
    return self._manager.save(step, args=args, force=force)

  def restore(self, abstract_state, step=None):
    """Restores (state, data_position) at `step` (default: the newest readable step).

    `abstract_state` is a pytree of jax.ShapeDtypeStruct with shardings: the arrays come back sharded like it.
    Unreadable steps are skipped with a warning naming them; a writer then moves them aside.
    """
    candidates = [step] if step is not None else sorted(self.steps(), reverse=True)
    errors = []
    for s in candidates:
      mismatch = self._other_network(s, abstract_state)
      if mismatch:
        raise CheckpointError(
            f'Checkpoint {self.directory / str(s)} was written by another network or method: {mismatch}. Resume '
            'it with the config it was trained with (config.json beside it), or train this config in another '
            '--workdir; the checkpoint is left as it is.')
      try:
        restored = self._manager.restore(s, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
      except Exception as e:  # pylint: disable=broad-except
        logging.warning('Skipping unreadable checkpoint %s: %s', self.directory / str(s), e)
        errors.append(f'step {s}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}')
        continue
      if self._writer and errors:
        self._set_aside([t for t in candidates if t > s])
      return restored.state, restored.data
    raise CheckpointError(f'No readable checkpoint in {self.directory} (tried {"; ".join(errors)}). '
                          'Remove the directory to start afresh, or point --workdir elsewhere.')

  def _other_network(self, step, abstract_state) -> str:
    """The first difference between the state saved at `step` and `abstract_state` (leaf paths and shapes), or ''
    when they agree or the step's metadata cannot be read (then the restore decides)."""
    try:
      saved = self._manager.item_metadata(step)['state']
    except Exception:  # pylint: disable=broad-except
      return ''
    if saved is None:
      return ''
    shapes = lambda tree: {sharding.tree_path(p): tuple(leaf.shape)
                           for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}
    theirs, ours = shapes(saved), shapes(abstract_state)
    for path in sorted(set(theirs) | set(ours)):
      if path not in theirs:
        return f'{path} (shape {ours[path]}) is not in it'
      if path not in ours:
        return f'it has {path} (shape {theirs[path]}), which this run does not'
      if theirs[path] != ours[path]:
        return f'{path} has shape {theirs[path]} there and {ours[path]} here'
    return ''

  def _set_aside(self, steps):
    """Renames unreadable step directories to `<step>.unreadable-<time>` (process 0), so they can be saved anew."""
    if jax.process_index() == 0:
      stamp = time.strftime('%Y%m%d-%H%M%S')
      for s in steps:
        target = self.directory / f'{s}.unreadable-{stamp}'
        (self.directory / str(s)).rename(target)
        logging.warning('Moved the unreadable checkpoint %s to %s.', self.directory / str(s), target)
    multihost_utils.sync_global_devices('cm_jax: unreadable checkpoints set aside')
    self._manager.reload()

  def wait(self):
    self._manager.wait_until_finished()

  def close(self):
    self._manager.close()
