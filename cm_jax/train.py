"""The trainer: one loop in fixed sections, the same code on one CPU, a GPU node or a TPU slice.

  experiment (config check -> mesh -> data and space -> model and objective -> abstract state) -> teacher
  -> state (restored, or born sharded) -> step fn -> loop (log, grids, checkpoints, preemption) -> finish -> report

Every method is an `Objective` (with its sampler); this file knows nothing else about it. A latent run differs only
in its space (latents.py): the step prepares each batch through it and samples are decoded by it. The experiment is
experiment.py's, the step train_step.py's; the other modes are modes.py's, evaluation/fid.py's, editing.py's and
export.py's, each run(config, workdir, devices=None).
"""

import re

from clu import metrics as clu_metrics
from clu import parameter_overview
import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from cm_jax import checkpoint
from cm_jax import console
from cm_jax import distributed
from cm_jax import run_config
from cm_jax import writers
from cm_jax.evaluation import report
from cm_jax.experiment import Experiment, load_teacher, write_config


def describe(exp: Experiment, name: str, workdir) -> str:
  """The console's line naming a run: config, objective, network and its trained parameters, mesh, per-device state
  bytes, workdir."""
  state = exp.abstract_state
  trained = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
  per_device = sum(int(np.prod(x.sharding.shard_shape(x.shape))) * x.dtype.itemsize for x in jax.tree.leaves(state))
  mesh = ' '.join(f'{k}={v}' for k, v in exp.mesh.shape.items())
  space = exp.space.describe()
  where = '' if space['space'] == 'pixels' else f' on {"x".join(map(str, exp.shape))} latents'
  return (f'cm_jax: {name or "config"}: {exp.config.objective.name}, {exp.config.model.name} '
          f'({trained / 1e6:.2f}M trained parameters){where}, mesh {mesh}, state {per_device / 2**20:.1f} MiB per '
          f'device, workdir {workdir}')


# ----------------------------------------------------------------------------------------------------------
# train
# ----------------------------------------------------------------------------------------------------------
def train_and_evaluate(config, workdir: str, devices=None, name: str = ''):
  """Trains `config` (named `name` on the console) in `workdir`, resuming from its newest checkpoint; returns the
  final state.

  Raises distributed.Preempted after saving a checkpoint when a SIGTERM reached any process.
  """
  run_config.check(config, workdir)  # another run's workdir: refused before anything is built, read or written
  exp = Experiment(config, devices)
  workdir = epath.Path(workdir)
  console.say(describe(exp, name, workdir))
  teacher = load_teacher(config, exp, required=exp.objective.distils is not None)
  teacher_params = None if teacher is None else teacher.params
  frozen = exp.frozen(teacher_params)  # the objective's own inputs (LPIPS weights) read before anything is written
  ckpt = checkpoint.Checkpointer(workdir, config.checkpoint.max_to_keep, config.checkpoint.every_steps,
                                 config.checkpoint.async_save, writer=True)
  state = restore_or_init(exp, ckpt, teacher_params)
  write_config(config, workdir, int(state.step))  # after the restore: config.json changes only for its own run
  writer = writers.make_writers(config, workdir)
  writer.write_config(config)
  try:
    state = loop(exp, state, ckpt, writer, workdir, frozen, teacher_params)
  except distributed.Preempted:
    writer.close()
    raise
  write_samples(exp, state, writer, workdir, int(state.step), teacher_params)
  images = exp.objective.finish(exp, state, workdir) if exp.objective.finish is not None else None
  if config.eval.proxy:
    table = report.quality_report(exp, state, teacher, workdir, images)
    tag = lambda name: 'proxy/' + re.sub(r'[^A-Za-z0-9]+', '_', name).strip('_')  # 'ict (1-step)' -> 'ict_1_step'
    writer.write_scalars(int(state.step), {tag(k): v for k, v in table.items()})
  writer.close()
  return state


def restore_or_init(exp: Experiment, ckpt: checkpoint.Checkpointer, teacher_params=None):
  """The state restored onto this mesh from the newest checkpoint (its data position checked), else born sharded
  (from the teacher's parameters with teacher.init)."""
  config = exp.config
  if ckpt.steps():
    state, position = ckpt.restore(exp.abstract_state)
    start = int(state.step)
    if position['position'] != start or position['seed'] != config.seed:
      raise checkpoint.CheckpointError(
          f'Checkpoint {ckpt.directory / str(start)} stores data position {position} but state step {start} '
          f'and seed {config.seed}.')
    console.say(f'Resuming from step {start} ({ckpt.directory / str(start)}).')
    return state
  if config.teacher.init:
    if teacher_params is None:
      raise ValueError('teacher.init=True needs teacher.workdir.')
    console.say('Starting from the teacher\'s parameters (teacher.init=True).')
  state = exp.init_state(teacher_params if config.teacher.init else None)
  parameter_overview.log_parameter_overview(state.params, include_stats='global', jax_logging_process=0)
  return state


def loop(exp: Experiment, state, ckpt, writer, workdir, frozen, teacher_params=None):
  """Steps from the state's step to train.num_steps: metrics averaged per log interval, sample grids, checkpoints
  (also on a SIGTERM, then distributed.Preempted), the console's progress; returns the final state."""
  config = exp.config
  start = int(state.step)
  step_fn = exp.train_step()
  progress = console.Progress(config.train.num_steps,
                              console.console_every(config.train.num_steps, config.train.log_every), start)
  batches = exp.batches(start)
  collection, accumulated, averages, preempted, step = None, None, {}, False, start
  first_bad = (jnp.zeros((), jnp.int32), jnp.zeros((), jnp.float32))  # on device: no host round trip per step
  try:
    with distributed.PreemptionWatch() as preemption:
      for step in range(start + 1, config.train.num_steps + 1):
        state, metrics = step_fn(state, next(batches), frozen)
        first_bad = _first_nonfinite(first_bad, step, metrics['nonfinite'], metrics['loss'])
        collection = collection or _collection_for(tuple(metrics))
        update = collection.single_from_model_output(**metrics)
        accumulated = update if accumulated is None else accumulated.merge(update)
        if step % config.train.log_every == 0 or step == config.train.num_steps:
          _check_finite(config, first_bad, ckpt)
          averages = {k: float(v) for k, v in accumulated.compute().items()}
          writer.write_scalars(step, averages)
          accumulated = None
        if config.sampling.grid_every and (step % config.sampling.grid_every == 0):
          write_samples(exp, state, writer, workdir, step, teacher_params)
          progress.note('samples')
        preempted = preemption.reached(step)
        if preempted or ckpt.should_save(step) or step == config.train.num_steps:
          _check_finite(config, first_bad, ckpt)
          writer.flush()  # the logged history up to this step is on disk before its checkpoint is
          ckpt.save(step, state, {'position': step, 'seed': config.seed}, force=True)
          progress.note('checkpoint')
        rate = progress.end_step(step, averages)
        if rate is not None:
          writer.write_scalars(step, {'steps_per_sec': rate})
        if preempted:
          break
  finally:
    batches.close()
    ckpt.wait()
    ckpt.close()
    writer.flush()
  if preempted:
    raise distributed.Preempted(f'Preempted: saved step {step} to {ckpt.directory / str(step)}; '
                                'run the same command again to resume from it.')
  return state


def _collection_for(names):
  """A clu Collection averaging each named scalar over the logging interval."""
  return clu_metrics.Collection.create(**{n: clu_metrics.Average.from_output(n) for n in names})


@jax.jit
def _first_nonfinite(first_bad, step, nonfinite, loss):
  """(step, loss) of the first step whose loss, gradient or parameters were not finite; (0, 0) while none was."""
  new = (first_bad[0] == 0) & (nonfinite > 0)
  return jnp.where(new, step, first_bad[0]), jnp.where(new, loss, first_bad[1])


def _check_finite(config, first_bad, ckpt):
  """Stops the run (train.nonfinite='stop') if a step went non-finite, naming it and the last checkpoint. Asked at
  logging and checkpoint steps only, so the loop never waits for a step's result in between."""
  step, loss = (x.item() for x in jax.device_get(first_bad))
  if config.train.nonfinite == 'stop' and step:
    ckpt.wait()
    last = ckpt.latest_step()
    where = f'{ckpt.directory / str(last)}' if last is not None else 'none (no checkpoint was saved yet)'
    raise FloatingPointError(f'Non-finite loss, gradient or parameters at step {step} (loss={loss}). '
                             f'Last good checkpoint: {where}.')


def write_samples(exp: Experiment, state, writer, workdir, step: int, teacher_params=None):
  """A grid of samples from the first EMA: PNG under workdir/samples and a TensorBoard image."""
  c = exp.config
  num_steps = exp.sampler.grid_steps(c)
  samples = exp.generate(state.ema[0], c.sampling.num_grid, num_steps, c.seed + 1, teacher_params)
  image = writers.samples_image(samples)
  writers.save_png(epath.Path(workdir) / 'samples' / f'step_{step:08d}.png', image)
  writer.write_images(step, {f'samples/{num_steps}_step': image})
