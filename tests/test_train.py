"""The trainer: exact resume, device-count invariance, compile-once, skipping non-finite steps, teachers."""

import importlib

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from cm_jax import checkpoint
from cm_jax import experiment
from cm_jax import models
from cm_jax import modes
from cm_jax import objectives
from cm_jax import sampling
from cm_jax import train
from configs import digits_cd
from configs import digits_ct
from configs import digits_ict
from configs import digits_scd
from configs import digits_trigflow
from helpers import losses
from helpers import tiny_config


def test_resume_is_bitwise_exact(tmp_path):
  """2N steps straight == N steps, a new process-like restart from the checkpoint, N more steps."""
  devices = jax.devices()[:1]
  straight = train.train_and_evaluate(tiny_config(num_steps=12), tmp_path / 'straight', devices)

  config = tiny_config(num_steps=12)
  exp = experiment.Experiment(config, devices)
  state, step_fn = exp.init_state(), exp.train_step()
  ckpt = checkpoint.Checkpointer(tmp_path / 'resumed', save_every=6)
  with exp.batches(0) as batches:
    for step in range(1, 7):
      state, _ = step_fn(state, next(batches), exp.frozen())
  ckpt.save(6, state, {'position': 6, 'seed': config.seed})
  ckpt.wait()
  ckpt.close()
  experiment.write_config(config, tmp_path / 'resumed')
  resumed = train.train_and_evaluate(config, tmp_path / 'resumed', devices)

  assert int(resumed.step) == int(straight.step) == 12
  chex.assert_trees_all_equal(straight, resumed)


def test_eight_devices_match_one_device():
  config = tiny_config(num_steps=8, batch_size=16)
  losses_1, state_1 = losses(config, jax.devices()[:1], 8)
  losses_8, state_8 = losses(config, jax.devices()[:8], 8)
  assert len(state_8.params['dense_in']['kernel'].sharding.device_set) == 8
  np.testing.assert_allclose(losses_8, losses_1, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(state_1.params), jax.tree.leaves(state_8.params)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  assert losses_1[0] != losses_1[-1]


def test_train_step_compiles_once_across_curriculum_stages():
  config = tiny_config(num_steps=8)
  config.objective.s0, config.objective.s1 = 2, 16  # N(k) = 3, 5, 9, 17 over 8 steps
  exp = experiment.Experiment(config, jax.devices()[:1])
  state, step_fn = exp.init_state(), exp.train_step()
  scales = []
  with exp.batches(0) as batches:
    for _ in range(8):
      state, metrics = step_fn(state, next(batches), exp.frozen())
      scales.append(int(metrics['num_scales']))
  assert scales == [3, 3, 5, 5, 9, 9, 17, 17]
  assert step_fn._cache_size() == 1


def test_ema_and_optimizer_are_applied():
  """Warm-up: the first update is zero (lr = 0 at step 0); EMA(rate r) after k steps follows its recursion."""
  config = tiny_config(num_steps=3)
  exp = experiment.Experiment(config, jax.devices()[:1])
  init = exp.init_state()
  params0 = jax.tree.map(np.asarray, init.params)
  step_fn = exp.train_step()
  with exp.batches(0) as batches:
    s1, _ = step_fn(init, next(batches), exp.frozen())
    chex.assert_trees_all_equal(params0, s1.params)  # linear warm-up starts at learning rate 0
    s2, _ = step_fn(s1, next(batches), exp.frozen())
  leaf = lambda t: np.asarray(t['dense_out']['kernel'])  # zero-initialised: only it moves first
  assert not np.allclose(leaf(s2.params), leaf(params0))
  for rate, ema in zip(config.ema.rates, s2.ema):
    expected = rate * (rate * leaf(params0) + (1 - rate) * leaf(params0)) + (1 - rate) * leaf(s2.params)
    np.testing.assert_allclose(leaf(ema), expected, rtol=1e-6)


def test_nonfinite_loss_stops_naming_step_and_checkpoint(tmp_path):
  config = tiny_config(num_steps=12)
  config.optim.learning_rate = 1e30  # the update at step 2 makes the loss at step 3 infinite or NaN
  config.optim.grad_clip = 0.0
  config.optim.warmup_steps = 0
  with pytest.raises(FloatingPointError, match=r'Non-finite loss, gradient or parameters at step \d+.*Last good checkpoint'):
    train.train_and_evaluate(config, tmp_path, jax.devices()[:1])


def test_nonfinite_steps_can_be_skipped():
  config = tiny_config(num_steps=6)
  config.train.nonfinite = 'skip'
  exp = experiment.Experiment(config, jax.devices()[:1])
  state, step_fn = exp.init_state(), exp.train_step()
  with exp.batches(0) as batches:
    batch = next(batches)
  bad = dict(batch, image=batch['image'].at[0, 0].set(jnp.nan))
  before = jax.tree.map(np.asarray, state)  # the step donates its input state
  new, metrics = step_fn(state, bad, exp.frozen())
  assert float(metrics['nonfinite']) == 1.0 and int(new.step) == 1
  chex.assert_trees_all_equal(before.replace(step=new.step), new)


# ----------------------------------------------------------------------------------------------------------
# Teachers: a diffusion run, read in its own parameterisation.
# ----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope='module')
def edm_teacher(tmp_path_factory):
  """A saved EDM diffusion run of the tiny experiment, its parameters moved off the zero-output initialisation."""
  workdir = tmp_path_factory.mktemp('edm_teacher')
  config = tiny_config('edm')
  exp = experiment.Experiment(config, jax.devices()[:1])
  state = exp.init_state()
  params = jax.tree.map(lambda p: p + 0.1, state.params)
  ckpt = checkpoint.Checkpointer(workdir, save_every=1)
  ckpt.save(1, state.replace(params=params, ema=tuple(params for _ in state.ema)), {'position': 1, 'seed': 0})
  ckpt.wait()
  ckpt.close()
  experiment.write_config(config, workdir)
  return workdir


def _student(objective_config, teacher_workdir, parameterization='trigflow', **objective):
  """The tiny experiment's network as a student of the run in `teacher_workdir`."""
  c = tiny_config(num_steps=2)
  c.parameterization.name = parameterization
  c.objective = objective_config.get_config().objective
  c.objective.update(objective)
  c.teacher.workdir = str(teacher_workdir)
  return c


def test_an_edm_teacher_of_a_trigflow_student_samples_with_its_own_parameterisation(edm_teacher):
  """The quality table's teacher row is the teacher run's own Heun sampler, not the student's parameterisation."""
  devices = jax.devices()[:1]
  config = _student(digits_scd, edm_teacher, teacher='edm')
  exp = experiment.Experiment(config, devices)
  teacher = experiment.load_teacher(config, exp)
  own_exp, own_state = experiment.restore_latest(teacher.experiment.config, edm_teacher, devices)
  steps = own_exp.config.sampling.teacher_steps
  expected = own_exp.generate(own_state.ema[0], 16, steps, 3)
  np.testing.assert_array_equal(teacher.experiment.generate(teacher.params, 16, steps, 3), expected)
  heun = jax.jit(sampling.EDM_HEUN.build(config, exp.model, exp.process), static_argnames=('shape', 'num_steps'))
  rng = jax.random.fold_in(jax.random.PRNGKey(3), 0)
  as_trigflow = heun(teacher.params, rng, None, shape=(16,) + exp.shape, num_steps=steps)
  assert np.abs(np.asarray(as_trigflow) - expected).max() > 1e-2  # read as TrigFlow, the parameters sample otherwise


def test_a_teacher_read_in_another_parameterisation_is_refused(edm_teacher):
  devices = jax.devices()[:1]
  distils = _student(digits_scd, edm_teacher, teacher='trigflow')
  with pytest.raises(ValueError, match="parameterization.name='edm', but distillation .* reads it as 'trigflow'"):
    experiment.load_teacher(distils, experiment.Experiment(distils, devices))
  starts_from = _student(digits_trigflow, edm_teacher)
  starts_from.teacher.init = True
  with pytest.raises(ValueError, match="parameterization.name='edm', but teacher.init reads it as 'trigflow'"):
    experiment.load_teacher(starts_from, experiment.Experiment(starts_from, devices))


def test_a_consistency_run_is_not_a_distillation_teacher(tmp_path):
  """CD refuses an iCT run as its teacher; iCT may start from it (teacher.init: LCF starts from an LCD run)."""
  train.train_and_evaluate(tiny_config(num_steps=2), tmp_path / 'ict', jax.devices()[:1])
  config = _student(digits_cd, tmp_path / 'ict', parameterization='edm')
  with pytest.raises(ValueError, match="holds a 'ict' run, a consistency model; a distillation teacher"):
    experiment.load_teacher(config, experiment.Experiment(config, jax.devices()[:1]))
  starts_from = _student(digits_ict, tmp_path / 'ict', parameterization='edm')
  starts_from.teacher.init = True
  assert experiment.load_teacher(starts_from, experiment.Experiment(starts_from, jax.devices()[:1])) is not None


def test_the_network_must_match_only_where_the_teacher_parameters_are_read(edm_teacher):
  """A teacher that only heads the quality table may have any network; one to start from must have this run's."""
  devices = jax.devices()[:1]
  config = _student(digits_ict, edm_teacher, parameterization='edm')
  config.model.hidden = 2 * config.model.hidden
  assert experiment.load_teacher(config, experiment.Experiment(config, devices)).experiment.config.model.hidden == 32
  config.teacher.init = True
  with pytest.raises(ValueError, match="has network .* which does not match this run's network"):
    experiment.load_teacher(config, experiment.Experiment(config, devices))


@pytest.mark.parametrize('key, value, fragment', [
    ('train.nonfinite', 'ignore', "train.nonfinite='ignore'; expected 'stop' or 'skip'"),
    ('train.num_steps', 0, 'train.num_steps=0 must be at least 1'),
    ('train.batch_size', 0, 'train.batch_size=0 must be at least 1'),
    ('train.log_every', 0, 'train.log_every=0 must be at least 1'),
    ('checkpoint.every_steps', -5, 'checkpoint.every_steps=-5 must be at least 1'),
    ('checkpoint.max_to_keep', 0, 'checkpoint.max_to_keep=0 must be at least 1'),
    ('sampling.grid_every', -1, r'sampling.grid_every=-1 must be at least 0 \(0: off\)'),
    ('sampling.num_grid', 0, 'sampling.num_grid=0 must be at least 1'),
    ('sampling.teacher_steps', 1, 'sampling.teacher_steps=1 must be at least 2'),
    ('eval.num_samples', 1, 'eval.num_samples=1 must be at least 2'),
    ('optim.warmup_steps', -1, r'optim.warmup_steps=-1 must be at least 0 \(0: off\)'),
    ('eval.steps', (), r'eval.steps=\(\) must be a non-empty list'),
    ('eval.steps', (1, 0), r'eval.steps=\(1, 0\) must be a non-empty list of step counts >= 1'),
    ('optim.learning_rate', -1e-3, 'optim.learning_rate=-0.001'),
    ('optim.grad_clip', -1.0, 'optim.grad_clip=-1.0'),
    ('optim.eps', 0.0, 'optim.eps=0.0 positive'),
    ('optim.b1', -0.1, r'optim.b1=-0.1 and optim.b2=0.995 must be in \[0, 1\)'),
    ('optim.b2', 1.0, 'optim.b2=1.0'),
    ('model.dropout', 1.0, r'model.dropout=1.0 must be in \[0, 1\)'),
    ('model.label_dropout', -0.1, 'model.label_dropout=-0.1'),
    ('ema.rates', (), r'ema.rates=\(\) must be a non-empty list of rates in \[0, 1\)'),
    ('ema.rates', (0.9, 1.0), r'ema.rates=\(0.9, 1.0\) must be'),
    ('logging.wandb.mode', 'cloud', "logging.wandb.mode='cloud'"),
    ('sampling.mid_sigmas', (100.0,), r'sampling.mid_sigmas=\(100.0,\) must decrease strictly inside'),
    ('objective.s0', 0, 'iCT needs 1 <= s0 <= s1')])
def test_settings_out_of_range_stop_before_any_work(key, value, fragment):
  config = tiny_config(num_steps=2)
  config.update_from_flattened_dict({key: value})
  with pytest.raises(ValueError, match=fragment):
    experiment.Experiment(config, jax.devices()[:1])


def test_settings_at_the_edge_of_their_range_are_accepted():
  """The least value of every checked count or rate passes check_config (a check off by one would refuse it)."""
  config = tiny_config(num_steps=1, batch_size=1)
  config.update_from_flattened_dict({
      'train.log_every': 1, 'checkpoint.every_steps': 1, 'checkpoint.max_to_keep': 1, 'sampling.num_grid': 1,
      'sampling.teacher_steps': 2, 'eval.num_samples': 2, 'sampling.grid_every': 0, 'optim.warmup_steps': 0,
      'eval.steps': (1,), 'optim.learning_rate': 0.0, 'optim.grad_clip': 0.0, 'optim.b1': 0.0, 'optim.b2': 0.0,
      'model.dropout': 0.0, 'model.label_dropout': 0.0, 'ema.rates': (0.0,), 'train.nonfinite': 'skip'})
  experiment.check_config(config)


def test_ct_with_one_level_is_refused():
  """N(0) = s0 levels: s0 = 1 would sample from an empty range (a NaN loss at step 0 in the official code's terms)."""
  config = tiny_config(num_steps=2)
  config.objective = digits_ct.get_config().objective
  config.objective.s0 = 1
  with pytest.raises(ValueError, match='CT starts with N\\(0\\) = s0 levels, which needs s0 >= 2'):
    experiment.Experiment(config, jax.devices()[:1])


def _ct_tiny(num_steps=4):
  """The tiny experiment trained with CT (s0 2, s1 40, mu0 0.9, the paper's mu) and no learning-rate warm-up."""
  config = tiny_config(num_steps=num_steps)
  config.objective = digits_ct.get_config().objective
  config.optim.warmup_steps = 0
  return config


def test_the_target_moves_at_the_rate_of_the_step_being_taken():
  """theta- <- mu(k) theta- + (1 - mu(k)) theta_{k+1} at step k = 0, 1, ... (the counter before the update).
  K = 4, s0 = 2, s1 = 40: N(0) = 2, mu(0) = exp(2 ln 0.9 / 2) = 0.9; N(1) = ceil(sqrt(1/4 (41^2 - 4) + 4) - 1) + 1
  = ceil(19.57) + 1 = 21, mu(1) = exp(2 ln 0.9 / 21) = 0.990016."""
  exp = experiment.Experiment(_ct_tiny(), jax.devices()[:1])
  state, step_fn = exp.init_state(), exp.train_step()
  initial = jax.tree.map(np.array, state.target)  # copies: the step donates the state
  before = initial
  with exp.batches(0) as batches:
    for mu in (0.9, 0.990016):
      state, _ = step_fn(state, next(batches), exp.frozen())
      expected = jax.tree.map(lambda t, p: mu * t + (1.0 - mu) * np.asarray(p), before, state.params)
      for got, want in zip(jax.tree.leaves(state.target), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-9)
      before = jax.tree.map(np.array, state.target)
  moved = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(initial))]
  assert any(moved)


def test_init_from_the_teacher_sets_the_network_its_emas_and_its_target():
  """teacher.init: theta, every sampling EMA and theta- start equal to the teacher's parameters."""
  exp = experiment.Experiment(_ct_tiny(), jax.devices()[:1])
  fresh = jax.tree.map(np.array, exp.init_state().params)
  teacher = jax.tree.map(lambda p: p + 0.25, fresh)
  state = exp.init_state(teacher)
  assert len(state.ema) == 2 and int(state.step) == 0
  for tree in (state.params, *state.ema, state.target):
    chex.assert_trees_all_equal(tree, teacher)


def test_resuming_with_another_network_names_the_leaf_and_leaves_the_checkpoint(tmp_path):
  train.train_and_evaluate(tiny_config(num_steps=2), tmp_path, jax.devices()[:1])
  wider = tiny_config(num_steps=4)
  wider.model.hidden = 2 * wider.model.hidden
  with pytest.raises(ValueError, match=r'model\.hidden is 32 there, 64 here'):  # refused at the config first
    train.train_and_evaluate(wider, tmp_path, jax.devices()[:1])
  (tmp_path / 'config.json').unlink()  # a workdir without its config: the restore names the leaf
  with pytest.raises(checkpoint.CheckpointError,
                     match=r'written by another network or method: ema/0/block_0/affine/bias has shape \(32,\) there '
                           r'and \(64,\) here'):
    train.train_and_evaluate(wider, tmp_path, jax.devices()[:1])
  assert sorted(p.name for p in (tmp_path / 'checkpoints').iterdir()) == ['1', '2']  # nothing moved aside


def test_a_distillation_run_needs_a_teacher_run_to_train_not_to_sample(tmp_path, edm_teacher):
  config = tiny_config(num_steps=2)
  config.objective = ml_collections.ConfigDict(dict(name='cd', num_scales=18, solver='heun', target_ema=0.0,
                                                    distance='l2'))
  with pytest.raises(ValueError, match=r"objective.name='cd' distils a diffusion teacher: set teacher.workdir"):
    train.train_and_evaluate(config, tmp_path / 'alone', jax.devices()[:1])
  assert not (tmp_path / 'alone' / 'checkpoints').exists()
  config.teacher.workdir = str(edm_teacher)
  train.train_and_evaluate(config, tmp_path / 'student', jax.devices()[:1])
  config.teacher.workdir = ''  # sampling a trained CD model reads no teacher
  modes.sample(config, str(tmp_path / 'student'), jax.devices()[:1])
  assert list((tmp_path / 'student' / 'samples').glob('final_*_step.npz'))


@pytest.mark.parametrize('name', ['edm', 'trigflow', 'latent_ddpm', 'cd', 'ct', 'ict', 'ect', 'sct', 'scd', 'lcd',
                                  'lcf', 'autoencoder'])
def test_every_objective_refuses_a_key_it_does_not_read_and_names_a_missing_one(name):
  config = importlib.import_module(f'configs.digits_{name}').get_config()
  model = models.build_model(config.model)
  objectives.make_objective(config, model)  # the config as shipped builds
  extra = config.copy_and_resolve_references()
  extra.objective.unlock()['bogus'] = 1  # e.g. a key of another method
  with pytest.raises(ValueError, match=r"unknown objective key\(s\) \['bogus'\]"):
    objectives.make_objective(extra, model)
  required = sorted(objectives.objective_keys(config.objective.name)[0] - {'name'})
  if required:  # ddpm reads its name only
    missing = config.copy_and_resolve_references()
    del missing.objective.unlock()[required[0]]
    with pytest.raises(ValueError, match=rf"missing objective key\(s\) \['{required[0]}'\]"):
      objectives.make_objective(missing, model)
