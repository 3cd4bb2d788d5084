"""The trainer: one loop in fixed sections, the same code on one CPU, a GPU node or a TPU slice.

  config check -> mesh -> data -> model and objective -> state (born sharded) -> step fn -> restore -> loop -> report

Every method is an `Objective`; this file knows nothing else about it.
"""

import dataclasses
import functools
import re
from typing import Any, Optional

from absl import logging
from clu import metrics as clu_metrics
from clu import parameter_overview
import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath
from jax.experimental import multihost_utils

from cm_jax import checkpoint
from cm_jax import data as data_lib
from cm_jax import distributed
from cm_jax import models
from cm_jax import objectives
from cm_jax import sampling
from cm_jax import sharding
from cm_jax import solvers
from cm_jax import writers
from cm_jax.data import pipeline
from cm_jax.parameterization import make_parameterization
from cm_jax.state import TrainState, create_state, ema_update, make_optimizer


# ----------------------------------------------------------------------------------------------------------
# The train step.
# ----------------------------------------------------------------------------------------------------------
def make_train_step(objective, tx, ema_rates, seed: int, skip_nonfinite: bool):
  """train_step(state, batch, teacher) -> (state, metrics): one optimiser step, target and EMA updates.

  Step k draws its randomness from fold_in(PRNGKey(seed), k). With `skip_nonfinite`, a step whose loss or
  gradient is not finite leaves the state unchanged except for the step counter (counted in the metrics).
  """
  base_key = jax.random.PRNGKey(seed)

  def train_step(state: TrainState, batch, teacher):
    rng = jax.random.fold_in(base_key, state.step)
    frozen = {'target': state.target, 'teacher': teacher}

    def loss_fn(trainable):
      return objective.loss(trainable['params'], trainable['extra'], frozen, batch, rng, state.step)

    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.trainable())
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.trainable())
    trainable = optax.apply_updates(state.trainable(), updates)
    params = trainable['params']
    new = state.replace(
        step=state.step + 1, params=params, extra=trainable['extra'], opt_state=opt_state,
        ema=tuple(ema_update(e, params, r) for e, r in zip(state.ema, ema_rates)),
        target=(None if objective.target_rate is None
                else ema_update(state.target, params, objective.target_rate(state.step))))
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    if skip_nonfinite:
      keep = lambda n, o: jnp.where(finite, n, o)
      new = jax.tree.map(keep, new.replace(step=state.step), state).replace(step=state.step + 1)
    metrics = dict(metrics, grad_norm=grad_norm, nonfinite=1.0 - finite.astype(jnp.float32))
    return new, metrics

  return train_step


def _collection_for(names):
  """A clu Collection averaging each named scalar over the logging interval."""
  return clu_metrics.Collection.create(**{n: clu_metrics.Average.from_output(n) for n in names})


# ----------------------------------------------------------------------------------------------------------
# Building blocks shared by train / sample / eval.
# ----------------------------------------------------------------------------------------------------------
def check_config(config) -> None:
  """Fails before any compilation on settings that cannot work together, naming the key."""
  if config.train.nonfinite not in ('stop', 'skip'):
    raise ValueError(f"train.nonfinite={config.train.nonfinite!r}; expected 'stop' or 'skip'.")
  if config.train.num_steps <= 0 or config.train.batch_size <= 0:
    raise ValueError('train.num_steps and train.batch_size must be positive.')
  if any(not 0.0 <= r < 1.0 for r in config.ema.rates) or not config.ema.rates:
    raise ValueError(f'ema.rates={tuple(config.ema.rates)} must be a non-empty list of rates in [0, 1).')


class Experiment:
  """Mesh, data source, model, objective and the abstract sharded state of one config."""

  def __init__(self, config, devices=None):
    check_config(config)
    self.config = config
    self.mesh = sharding.make_mesh(config.mesh, devices)
    sharding.check_batch_divides(config.train.batch_size, self.mesh)
    self.source = data_lib.build_source(config.data)
    if config.model.num_classes > 0 and self.source.num_classes == 0:
      raise ValueError(f'model.num_classes={config.model.num_classes} but data set {config.data.name!r} '
                       'has no labels.')
    self.model = models.build_model(config.model)
    self.param = make_parameterization(config)
    self.objective = objectives.make_objective(config, self.model)
    self._sample_fns = {}
    self.sample_fn()  # an inconsistent sampling config (levels, guidance scale) fails now, not after training
    self.tx = make_optimizer(config.optim)
    shape = (1,) + tuple(self.source.shape)
    cond = jnp.zeros((1,), jnp.int32) if config.model.num_classes > 0 else None
    self._init = functools.partial(create_state, model=self.model, objective=self.objective, tx=self.tx,
                                   sample_input=(jnp.zeros(shape), jnp.zeros((1,)), cond),
                                   num_ema=len(config.ema.rates))
    abstract = jax.eval_shape(self._init, jax.random.PRNGKey(config.seed))
    self.state_sharding = sharding.tree_shardings(abstract, self.mesh, tuple(config.mesh.rules),
                                                  config.mesh.min_size)
    self.abstract_state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, self.state_sharding)
    self.batch_sharding = sharding.batch_sharding(self.mesh)

  def init_state(self, teacher=None) -> TrainState:
    """The train state, born sharded: initialised inside jit with the rule-derived output shardings.

    With `teacher` parameters (config.teacher.init), the network, its EMAs and its target start from them
    (`models.init_from_teacher`).
    """
    def init(rng):
      state = self._init(rng)
      if teacher is None:
        return state
      params = models.init_from_teacher(state.params, teacher)
      return state.replace(params=params, ema=tuple(params for _ in state.ema),
                           target=None if state.target is None else params)
    return jax.jit(init, out_shardings=self.state_sharding)(jax.random.PRNGKey(self.config.seed))

  def train_step(self):
    """The jit-compiled train step: state sharded by the rules (and donated), batch split over the mesh."""
    c = self.config
    step = make_train_step(self.objective, self.tx, tuple(c.ema.rates), c.seed, c.train.nonfinite == 'skip')
    return jax.jit(step, in_shardings=(self.state_sharding, self.batch_sharding, None),
                   out_shardings=(self.state_sharding, sharding.replicated(self.mesh)), donate_argnums=(0,))

  def batches(self, start_step: int) -> pipeline.BatchIterator:
    """Global batches from `start_step` on, in the order fixed by (seed, step)."""
    return pipeline.BatchIterator(self.source, self.config.train.batch_size, self.config.seed, start_step,
                                  self.batch_sharding)

  def sample_fn(self, kind=None):
    """jit-compiled sample(params, rng, cond, shape, num_steps) for the given kind (default: this objective's),
    built once per kind so that every later call reuses its compilations."""
    kind = kind or self.objective.kind
    if kind not in self._sample_fns:
      fn = sampling.make_sample_fn(self.config, self.model, self.param, kind)
      self._sample_fns[kind] = jax.jit(fn, static_argnames=('shape', 'num_steps'))
    return self._sample_fns[kind]

  def generate(self, params, num: int, num_steps: int, seed: int, kind=None) -> np.ndarray:
    """`num` samples (host numpy), generated in batches of train.batch_size across the mesh."""
    fn = self.sample_fn(kind)
    batch = self.config.train.batch_size
    out = []
    for i in range(-(-num // batch)):
      rng = jax.random.fold_in(jax.random.PRNGKey(seed), i)
      cond = None
      if self.config.model.num_classes > 0:
        cond = jax.random.randint(jax.random.fold_in(rng, 1), (batch,), 0, self.config.model.num_classes)
      out.append(np.asarray(multihost_utils.process_allgather(
          fn(params, rng, cond, shape=(batch,) + tuple(self.source.shape), num_steps=num_steps), tiled=True)))
    return np.concatenate(out)[:num]


def write_config(config, workdir) -> None:
  """Writes the resolved config as JSON (process 0)."""
  if jax.process_index() == 0:
    path = epath.Path(workdir) / 'config.json'
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(config.to_json_best_effort(indent=2, sort_keys=True))


# ----------------------------------------------------------------------------------------------------------
# train
# ----------------------------------------------------------------------------------------------------------
def train_and_evaluate(config, workdir: str, devices=None):
  """Trains `config` in `workdir`, resuming from its newest checkpoint; returns the final state.

  Raises distributed.Preempted after saving a checkpoint when a SIGTERM reached any process.
  """
  exp = Experiment(config, devices)
  workdir = epath.Path(workdir)
  write_config(config, workdir)
  teacher = load_teacher(config, exp)
  teacher_params = None if teacher is None else teacher.params
  ckpt = checkpoint.Checkpointer(workdir, config.checkpoint.max_to_keep, config.checkpoint.every_steps,
                                 config.checkpoint.async_save, writer=True)

  # State: restored onto this mesh if a checkpoint exists, else born sharded.
  start = 0
  if ckpt.steps():
    state, position = ckpt.restore(exp.abstract_state)
    start = int(state.step)
    if position['position'] != start or position['seed'] != config.seed:
      raise checkpoint.CheckpointError(
          f'Checkpoint {ckpt.directory / str(start)} stores data position {position} but state step {start} '
          f'and seed {config.seed}.')
    logging.info('Resumed from %s at step %d.', ckpt.directory, start)
  else:
    if config.teacher.init:
      if teacher is None:
        raise ValueError('teacher.init=True needs teacher.workdir.')
      logging.warning('Initialising the network from the teacher in %s (teacher.init=True).', config.teacher.workdir)
    state = exp.init_state(teacher_params if config.teacher.init else None)
    parameter_overview.log_parameter_overview(state.params, include_stats='global', jax_logging_process=0)

  step_fn = exp.train_step()

  writer = writers.MetricWriter(workdir / 'tensorboard')
  progress = writers.Progress(config.train.num_steps, config.train.log_every, start)
  batches = exp.batches(start)
  collection, accumulated, previous, preempted = None, None, None, False
  try:
    with distributed.PreemptionWatch() as preemption:
      for step in range(start + 1, config.train.num_steps + 1):
        state, metrics = step_fn(state, next(batches), teacher_params)
        if previous is not None:
          _check_finite(config, *previous, ckpt)
        previous = (step, metrics)
        collection = collection or _collection_for(tuple(metrics))
        update = collection.single_from_model_output(**metrics)
        accumulated = update if accumulated is None else accumulated.merge(update)

        if step % config.train.log_every == 0 or step == config.train.num_steps:
          writer.write_scalars(step, {k: v for k, v in accumulated.compute().items()})
          accumulated = None
        progress(step, writer)
        if config.sampling.grid_every and (step % config.sampling.grid_every == 0):
          write_samples(exp, state, writer, workdir, step)
        preempted = preemption.reached(step)
        if preempted or ckpt.should_save(step) or step == config.train.num_steps:
          _check_finite(config, *previous, ckpt)
          ckpt.save(step, state, {'position': step, 'seed': config.seed}, force=True)
        if preempted:
          break
  finally:
    batches.close()
    ckpt.wait()
    ckpt.close()
    writer.flush()

  if preempted:
    writer.close()
    raise distributed.Preempted(f'Preempted: saved step {step} to {ckpt.directory / str(step)}; '
                                'run the same command again to resume from it.')
  write_samples(exp, state, writer, workdir, int(state.step))
  if config.eval.proxy:
    report = quality_report(exp, state, teacher, workdir)
    tag = lambda name: 'proxy/' + re.sub(r'[^A-Za-z0-9]+', '_', name).strip('_')  # 'ict (1-step)' -> 'ict_1_step'
    writer.write_scalars(int(state.step), {tag(k): v for k, v in report.items()})
  writer.close()
  return state


def _check_finite(config, step, metrics, ckpt):
  """Stops the run on a non-finite loss (train.nonfinite='stop'), naming the step and the last checkpoint."""
  if config.train.nonfinite == 'stop' and float(metrics['nonfinite']) > 0:
    ckpt.wait()
    last = ckpt.latest_step()
    where = f'{ckpt.directory / str(last)}' if last is not None else 'none (no checkpoint was saved yet)'
    raise FloatingPointError(f'Non-finite loss or gradient at step {step} (loss={float(metrics["loss"])}). '
                             f'Last good checkpoint: {where}.')


def write_samples(exp: Experiment, state, writer, workdir, step: int):
  """A grid of samples from the first EMA: PNG under workdir/samples and a TensorBoard image."""
  c = exp.config
  num_steps = c.sampling.teacher_steps if exp.objective.kind == 'diffusion' else 1
  samples = exp.generate(state.ema[0], c.sampling.num_grid, num_steps, seed=c.seed + 1)
  image = writers.samples_image(samples)
  writers.save_png(epath.Path(workdir) / 'samples' / f'step_{step:08d}.png', image)
  writer.write_images(step, {f'samples/{num_steps}_step': image})


# ----------------------------------------------------------------------------------------------------------
# Teacher, sampling and evaluation modes.
# ----------------------------------------------------------------------------------------------------------
def network_fields(model) -> dict:
  """A network's class and the fields that fix its function; rates that act only in training (dropout,
  label_dropout) and the compute dtype aside."""
  skip = {'parent', 'name', 'dropout', 'label_dropout', 'dtype'}
  return dict({f.name: getattr(model, f.name) for f in dataclasses.fields(model) if f.name not in skip},
              network=type(model).__name__)


@dataclasses.dataclass(frozen=True)
class Teacher:
  """A diffusion run's EMA parameters with its own Experiment: its network, parameterisation and sampler."""
  params: Any
  experiment: Experiment

  def generate(self, num: int, seed: int) -> np.ndarray:
    """`num` samples of the teacher's PF-ODE with its own Heun sampler (its config's sampling.teacher_steps)."""
    c = self.experiment.config
    return self.experiment.generate(self.params, num, c.sampling.teacher_steps, seed, 'diffusion')


def load_teacher(config, exp: Experiment) -> Optional[Teacher]:
  """The diffusion run in config.teacher.workdir (None when unset).

  Where this run reads its parameters -- a distillation loss (`Objective.teacher`) or the initialisation
  (teacher.init) -- its network must be this run's (`network_fields`, without a guidance input) and its
  parameterisation the one they are read in. Otherwise it only heads the quality table, sampled its own way.
  """
  if not config.teacher.workdir:
    return None
  from cm_jax import config_lib  # pylint: disable=g-import-not-at-top
  where = f'teacher.workdir={config.teacher.workdir!r}'
  teacher_config = config_lib.load_run_config(config.teacher.workdir)
  teacher_exp = Experiment(teacher_config, exp.mesh.devices.flatten().tolist())
  if teacher_exp.objective.kind != 'diffusion':
    raise ValueError(f'{where} holds a {teacher_config.objective.name!r} run, a consistency model; a teacher is '
                     'a diffusion run (objective.name edm or trigflow).')
  reads = {'distillation (objective.name=' + config.objective.name + ')': exp.objective.teacher,
           'teacher.init': config.parameterization.name if config.teacher.init else None}
  reads = {use: wanted for use, wanted in reads.items() if wanted is not None}
  teacher_network, network = network_fields(teacher_exp.model), network_fields(exp.model)
  if reads and teacher_network != dict(network, guidance_embedding=False):
    raise ValueError(f'The teacher in {where} has network {teacher_network}, which does not match this run\'s '
                     f'network {network} (without a guidance input).')
  for use, wanted in reads.items():
    if wanted != teacher_config.parameterization.name:
      raise ValueError(f'The teacher in {where} was trained with parameterization.name='
                       f'{teacher_config.parameterization.name!r}, but {use} reads it as {wanted!r}.')
  ckpt = checkpoint.Checkpointer(config.teacher.workdir)
  try:
    if not ckpt.steps():
      raise FileNotFoundError(f'{where} has no checkpoint.')
    state, _ = ckpt.restore(teacher_exp.abstract_state)
  finally:
    ckpt.close()
  logging.info('Loaded teacher EMA parameters from %s (step %d).', config.teacher.workdir, int(state.step))
  return Teacher(state.ema[0], teacher_exp)


def restore_latest(config, workdir, devices=None):
  """(experiment, state) from the newest readable checkpoint of a run; a clear error when there is none."""
  exp = Experiment(config, devices)
  ckpt = checkpoint.Checkpointer(workdir, config.checkpoint.max_to_keep)
  if not ckpt.steps():
    raise FileNotFoundError(f'No checkpoint in {ckpt.directory}: train first (--mode=train).')
  state, _ = ckpt.restore(exp.abstract_state)
  ckpt.close()
  return exp, state


def sample(config, workdir: str, devices=None):
  """Writes samples of the newest EMA parameters to workdir/samples (PNG grid and .npz)."""
  exp, state = restore_latest(config, workdir, devices)
  steps = (config.sampling.teacher_steps,) if exp.objective.kind == 'diffusion' else tuple(config.eval.steps)
  out = epath.Path(workdir) / 'samples'
  for num_steps in steps:
    samples = exp.generate(state.ema[0], config.eval.num_samples, num_steps, seed=config.seed + 2)
    writers.save_png(out / f'final_{num_steps}_step.png', writers.samples_image(samples[:config.sampling.num_grid]))
    if jax.process_index() == 0:
      with (out / f'final_{num_steps}_step.npz').open('wb') as f:
        np.savez(f, samples=samples)
    print(f'Wrote {len(samples)} samples ({num_steps} steps) to {out}.')


def evaluate(config, workdir: str, devices=None):
  """Prints the small-data quality table of the newest checkpoint (and of the teacher, if configured)."""
  exp, state = restore_latest(config, workdir, devices)
  return quality_report(exp, state, load_teacher(config, exp), workdir)


def quality_report(exp: Experiment, state, teacher: Optional[Teacher], workdir) -> dict:
  """Frechet distance of the digits proxy for the teacher (35 NFE) and the model at config.eval.steps."""
  from cm_jax.evaluation import report  # pylint: disable=g-import-not-at-top
  c = exp.config
  rows = []
  if teacher is not None:
    teacher_steps = teacher.experiment.config.sampling.teacher_steps
    rows.append(('teacher (EDM Heun)', solvers.edm_sampler_nfe(teacher_steps),
                 teacher.generate(c.eval.num_samples, c.seed + 3)))
  if exp.objective.kind == 'diffusion':
    rows.append((f'{c.objective.name} (EDM Heun)', solvers.edm_sampler_nfe(c.sampling.teacher_steps),
                 exp.generate(state.ema[0], c.eval.num_samples, c.sampling.teacher_steps, c.seed + 3)))
  else:
    for n in c.eval.steps:
      rows.append((f'{c.objective.name} ({n}-step)', n, exp.generate(state.ema[0], c.eval.num_samples, n, c.seed + 3)))
  return report.proxy_table(rows, epath.Path(workdir) / 'proxy_classifier.msgpack')
