"""The experiment of one config: its mesh, data source and space, network, objective and sharded state, and the
teacher it reads; what training, the pre-flight and every reading mode build first.

  check_config -> Experiment (mesh -> data and space -> model and objective -> abstract state, born sharded)
  -> load_teacher (another run, or a pipeline's own UNet) -> restore_latest (a run's newest checkpoint)
"""

import dataclasses
import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from cm_jax import checkpoint
from cm_jax import config_lib
from cm_jax import console
from cm_jax import latents
from cm_jax import models
from cm_jax import objectives
from cm_jax import run_config
from cm_jax import sharding
from cm_jax import text_latents
from cm_jax import writers
from cm_jax.data import pipeline
from cm_jax.parameterization import make_parameterization
from cm_jax.state import TrainState, create_state, make_optimizer
from cm_jax.train_step import make_train_step


def check_config(config) -> None:
  """Fails before any compilation on settings that cannot work, naming the key and its value."""
  c = config
  if c.train.nonfinite not in ('stop', 'skip'):
    raise ValueError(f"train.nonfinite={c.train.nonfinite!r}; expected 'stop' or 'skip'.")
  at_least = {'train.num_steps': (c.train.num_steps, 1), 'train.batch_size': (c.train.batch_size, 1),
              'train.log_every': (c.train.log_every, 1), 'checkpoint.every_steps': (c.checkpoint.every_steps, 1),
              'checkpoint.max_to_keep': (c.checkpoint.max_to_keep, 1), 'sampling.num_grid': (c.sampling.num_grid, 1),
              'sampling.teacher_steps': (c.sampling.teacher_steps, 2), 'eval.num_samples': (c.eval.num_samples, 2),
              'sampling.grid_every': (c.sampling.grid_every, 0), 'optim.warmup_steps': (c.optim.warmup_steps, 0),
              'data.workers': (c.data.get('workers', 0), 0)}  # get: a teacher run's config may predate the key
  for key, (value, least) in at_least.items():
    if value < least:
      raise ValueError(f'{key}={value} must be at least {least}' + (' (0: off).' if least == 0 else '.'))
  if not c.eval.steps or min(c.eval.steps) < 1:
    raise ValueError(f'eval.steps={tuple(c.eval.steps)} must be a non-empty list of step counts >= 1.')
  if c.optim.learning_rate < 0 or c.optim.grad_clip < 0 or not c.optim.eps > 0:
    raise ValueError(f'optim.learning_rate={c.optim.learning_rate} and optim.grad_clip={c.optim.grad_clip} must be '
                     f'>= 0 and optim.eps={c.optim.eps} positive.')
  if not (0 <= c.optim.b1 < 1 and 0 <= c.optim.b2 < 1):
    raise ValueError(f'optim.b1={c.optim.b1} and optim.b2={c.optim.b2} must be in [0, 1).')
  for key in ('dropout', 'label_dropout'):
    if not 0 <= c.model.get(key, 0.0) < 1:
      raise ValueError(f'model.{key}={c.model[key]} must be in [0, 1).')
  if any(not 0.0 <= r < 1.0 for r in c.ema.rates) or not c.ema.rates:
    raise ValueError(f'ema.rates={tuple(c.ema.rates)} must be a non-empty list of rates in [0, 1).')
  writers.check_logging_config(c)


class Experiment:
  """Mesh, data source and space, model, objective and the abstract sharded state of one config.

  `build_space(config, mesh) -> (space, source)` is latents.build; the pre-flight passes one that reads nothing.
  """

  def __init__(self, config, devices=None, build_space=latents.build):
    check_config(config)
    self.config = config
    self.mesh = sharding.make_mesh(config.mesh, devices)
    sharding.check_batch_divides(config.train.batch_size, self.mesh)
    self.space, self.source = build_space(config, self.mesh)
    self.shape = self.space.shape  # what the network sees: the data, or their latents
    self.num_classes = int(config.model.get('num_classes', 0))  # an autoencoder has no labels
    if self.num_classes > 0 and self.source.num_classes == 0:
      raise ValueError(f'model.num_classes={self.num_classes} but data set {config.data.name!r} has no labels.')
    self.model = models.build_model(config.model, getattr(self.space, 'unet_config', None))
    self.process = make_parameterization(config)
    self.objective = objectives.make_objective(config, self.model)
    self.sampler = self.objective.sampler
    self._sample_fn = None
    self._draw = jax.jit(self.draw, static_argnames=('batch', 'num_steps'))
    self.sample_fn()  # an inconsistent sampling config (levels, guidance scale) fails now, not after training
    self.tx = make_optimizer(config.optim)
    cond = jnp.zeros((1,), jnp.int32) if self.num_classes > 0 else None
    if self.text_conditioned:
      cond = self.space.example_condition(1)
    self.sample_input = (jnp.zeros((1,) + self.shape), jnp.zeros((1,)), cond)  # (x, c_noise, cond) for init
    self._init = functools.partial(create_state, model=self.model, objective=self.objective, tx=self.tx,
                                   sample_input=self.sample_input, num_ema=len(config.ema.rates))
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
    step = make_train_step(self.objective, self.space, self.tx, tuple(c.ema.rates), c.seed,
                           c.train.nonfinite == 'skip', self.mesh)
    return jax.jit(step, in_shardings=(self.state_sharding, self.batch_sharding, None),
                   out_shardings=(self.state_sharding, sharding.replicated(self.mesh)), donate_argnums=(0,))

  def frozen(self, teacher_params=None, abstract: bool = False) -> dict:
    """The train step's and the samplers' frozen inputs: the teacher's parameters, the space's and the objective's
    own (`Objective.inputs`: read now, before any compilation, and replicated; shapes only when `abstract`)."""
    replicated = sharding.replicated(self.mesh)
    inputs = self.objective.inputs(abstract)
    inputs = (jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated), inputs) if abstract
              else jax.device_put(inputs, replicated))
    return {'teacher': teacher_params, 'space': self.space.params, 'objective': inputs}

  def batches(self, start_step: int) -> pipeline.BatchIterator:
    """Global batches from `start_step` on, in the order fixed by (seed, step)."""
    return pipeline.BatchIterator(self.source, self.config.train.batch_size, self.config.seed, start_step,
                                  self.batch_sharding, workers=self.config.data.workers)

  def sample_fn(self):
    """The objective's jit-compiled sampler, sample(params, rng, cond, shape, num_steps), built once so that every
    later call reuses its compilations."""
    if self._sample_fn is None:
      fn = self.sampler.build(self.config, self.model, self.process)
      self._sample_fn = jax.jit(fn, static_argnames=('shape', 'num_steps'))
    return self._sample_fn

  @property
  def text_conditioned(self) -> bool:
    """Whether the run's network reads text (latent.pipeline: a Stable Diffusion UNet on captions or prompts)."""
    return hasattr(self.space, 'condition')

  def draw(self, params, space_params, rng, batch: int, num_steps: int, text=None):
    """`batch` samples of the sampling `params` (the objective's sample_params), decoded to the data's space and
    split over the mesh's devices; traceable. Batch i of a run is draw(..., fold_in(PRNGKey(seed), i), ...): labels
    (class-conditional runs) from fold_in(rng, 1), the sampler's noise from rng. A text-to-image run draws for
    `text` = (prompt ids [batch, k, L], negative prompt ids [k, L])."""
    cond = None
    if text is not None:
      cond = self.space.condition_with_null(space_params, *text)
    elif self.num_classes > 0:
      cond = jax.random.randint(jax.random.fold_in(rng, 1), (batch,), 0, self.num_classes)
    with jax.sharding.use_abstract_mesh(self.mesh.abstract_mesh):  # what per-device kernels shard by
      samples = self.sample_fn()(params, rng, cond, shape=(batch,) + self.shape, num_steps=num_steps)
    return jax.lax.with_sharding_constraint(self.space.decode(space_params, samples), self.batch_sharding)

  def draw_fn(self):
    """`draw` jit-compiled (batch and num_steps static), as --mode=sample and the sample grids run it."""
    return self._draw

  def generate(self, params, num: int, num_steps: int, seed: int, teacher_params=None) -> np.ndarray:
    """`num` samples (host numpy, decoded to the data's space), generated in batches of train.batch_size across the
    mesh from the trained `params` (the objective's sample_params: LoRA merges them into the teacher)."""
    params = self.objective.sample_params(params, {'teacher': teacher_params})
    batch = self.config.train.batch_size
    text = self.prompt_batches(-(-num // batch), batch)
    out = []
    for i in range(-(-num // batch)):
      samples = self._draw(params, self.space.params, jax.random.fold_in(jax.random.PRNGKey(seed), i), batch=batch,
                           num_steps=num_steps, text=text(i))
      out.append(np.asarray(multihost_utils.process_allgather(samples, tiled=True)))
    return np.concatenate(out)[:num]


  def prompt_batches(self, num_batches: int, batch: int):
    """i -> the `text` of draw's batch i: a text-to-image run's prompts (`prompts`, in order, cycled), else None."""
    if not self.text_conditioned:
      return lambda i: None
    ids, negative = self.prompts(num_batches * batch)
    return lambda i: (jnp.asarray(ids[i * batch:(i + 1) * batch]), jnp.asarray(negative))

  def prompt_texts(self, num: int) -> list[str]:
    """A text-to-image run's first `num` prompts: sampling.prompts (one per line, cycled) or the data's captions."""
    c = self.config.sampling
    if c.prompts:
      lines = text_latents.read_prompts(c.prompts)
    else:
      lines = self.source.captions(np.arange(min(num, len(self.source))))
    return [lines[i % len(lines)] for i in range(num)]

  def prompts(self, num: int):
    """(ids [num, k, L], negative ids [k, L]) of `prompt_texts(num)` and sampling.negative_prompt (or the empty
    prompt)."""
    lines, c = self.prompt_texts(num), self.config.sampling
    pipe = self.space.pipe
    return pipe.tokenize(lines), pipe.tokenize([c.negative_prompt])[0]


def write_config(config, workdir, start_step: int = 0) -> None:
  """Checks that `config` is the workdir's run (run_config.check: a ValueError naming the keys that define another
  run), then records it (process 0): WORKDIR/config.json atomically, and config_history/ when it changed. Called
  after the restore, so that a refused config or a failed restore leaves config.json as it was."""
  run_config.check(config, workdir)
  if jax.process_index() == 0:
    line = run_config.write(config, workdir, start_step)
    if line:
      console.say(line)


def network_fields(model) -> dict:
  """A network's class and the fields that fix its function; rates that act only in training (dropout,
  label_dropout), the compute dtype, rematerialisation and the guidance input (a student's addition) aside."""
  skip = {'parent', 'name', 'dropout', 'label_dropout', 'dtype', 'remat', 'guidance_embedding'}
  return dict({f.name: getattr(model, f.name) for f in dataclasses.fields(model) if f.name not in skip},
              network=type(model).__name__)


@dataclasses.dataclass(frozen=True)
class Teacher:
  """Another run's first-EMA parameters with its own Experiment: its network, parameterisation, space and sampler."""
  params: Any
  experiment: Experiment


def load_teacher(config, exp: Experiment, required: bool = False) -> Optional[Teacher]:
  """The run in config.teacher.workdir (None when unset; an error when `required`: training a distillation objective,
  sampling LoRA adapters).

  A distillation loss (`Objective.distils`) reads a diffusion run; teacher.init starts from any run. Where this run
  reads its parameters, the network must be this run's (`network_fields`: a student may add a guidance input), the
  parameterisation the one they are read in and the space (pixels, or one autoencoder's latents) the same.
  Otherwise the run only heads the quality table, sampled its own way.
  """
  if config.teacher.get('checkpoint'):  # a released network file (cm_jax/releases.py)
    from cm_jax import releases  # pylint: disable=g-import-not-at-top
    return releases.teacher(config, exp)
  if not config.teacher.workdir and exp.text_conditioned and required:
    return pipeline_teacher(config, exp)
  if not config.teacher.workdir:
    if required:  # the one place this is checked
      raise ValueError(f'objective.name={config.objective.name!r} distils a diffusion teacher: set teacher.workdir '
                       'to its run (or teacher.checkpoint to a released network file).')
    return None
  where = f'teacher.workdir={config.teacher.workdir!r}'
  teacher_config = config_lib.load_run_config(config.teacher.workdir)
  if teacher_config.get('lora', {}).get('rank', 0):
    raise ValueError(f'{where} holds LoRA adapters, which need their own teacher: name a run that trains its whole '
                     'network.')
  teacher_exp = Experiment(teacher_config, exp.mesh.devices.flatten().tolist())
  check_teacher(config, exp, teacher_exp, where)
  ckpt = checkpoint.Checkpointer(config.teacher.workdir)
  try:
    if not ckpt.steps():
      raise FileNotFoundError(f'{where} has no checkpoint.')
    state, _ = ckpt.restore(teacher_exp.abstract_state)
  finally:
    ckpt.close()
  console.say(f'Teacher: {config.teacher.workdir} ({teacher_config.objective.name}, step {int(state.step)}).')
  return Teacher(state.ema[0], teacher_exp)


def check_teacher(config, exp: Experiment, teacher_exp: Experiment, where: str) -> None:
  """Refuses a teacher (its Experiment; `where` names it) that `exp`'s run cannot read: a consistency model for a
  distillation loss, or where the run reads its parameters another network, space or parameterisation."""
  teacher_config = teacher_exp.config
  if exp.objective.distils is not None and not teacher_exp.sampler.diffusion:
    raise ValueError(f'{where} holds a {teacher_config.objective.name!r} run, a consistency model; a distillation '
                     'teacher is a diffusion run (objective.name edm, trigflow or ddpm).')
  reads = {'distillation (objective.name=' + config.objective.name + ')': exp.objective.distils,
           'teacher.init': config.parameterization.name if config.teacher.init else None}
  reads = {use: wanted for use, wanted in reads.items() if wanted is not None}
  teacher_network, network = network_fields(teacher_exp.model), network_fields(exp.model)
  if reads and teacher_network != network:
    raise ValueError(f'The teacher in {where} has network {teacher_network}, which does not match this run\'s '
                     f'network {network} (a guidance input aside).')
  if reads and teacher_exp.space.describe() != exp.space.describe():
    raise ValueError(f'The teacher in {where} works in {teacher_exp.space.describe()}, this run in '
                     f'{exp.space.describe()}: a teacher must share the student\'s data space.')
  for use, wanted in reads.items():
    if wanted != teacher_config.parameterization.name:
      raise ValueError(f'The teacher in {where} was trained with parameterization.name='
                       f'{teacher_config.parameterization.name!r}, but {use} reads it as {wanted!r}.')


def pipeline_config(config):
  """The config that samples a run's pipeline (latent.pipeline) as it is: its UNet, DDPM-trained, no adapters."""
  c = config.copy_and_resolve_references()
  with c.unlocked():
    c.objective = type(c.objective)(dict(name='ddpm'))
    c.model.guidance_embedding = False
    c.lora.rank = 0
    c.teacher.workdir, c.teacher.init = '', False
  return c


def pipeline_teacher(config, exp: Experiment) -> Teacher:
  """The pipeline's own UNet (latent.pipeline) as the diffusion teacher of a run that names no teacher.workdir."""
  pipe = exp.space.pipe
  if pipe.unet_config.get('time_cond_proj_dim') is not None:
    raise ValueError(f'latent.pipeline={pipe.path!r} holds an LCM UNet (time_cond_proj_dim is set), not a diffusion '
                     'model: distil from the Stable Diffusion pipeline it was distilled from.')
  teacher_exp = Experiment(pipeline_config(config), exp.mesh.devices.flatten().tolist())
  console.say(f'Teacher: the UNet of {pipe.path}.')
  return Teacher({'unet': pipe.unet_params}, teacher_exp)


def restore_latest(config, workdir, devices=None):
  """(experiment, state) from the newest readable checkpoint of a run; a clear error when there is none. With
  init.checkpoint the state is a released network's at step 0 (cm_jax/releases.py)."""
  exp = Experiment(config, devices)
  if config.get('init', {}).get('checkpoint'):
    from cm_jax import releases  # pylint: disable=g-import-not-at-top
    return exp, releases.initial_state(config, exp)
  ckpt = checkpoint.Checkpointer(workdir, config.checkpoint.max_to_keep)
  if not ckpt.steps():
    raise FileNotFoundError(f'No checkpoint in {ckpt.directory}: train first (--mode=train).')
  state, _ = ckpt.restore(exp.abstract_state)
  ckpt.close()
  return exp, state
