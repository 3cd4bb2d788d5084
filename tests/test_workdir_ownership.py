"""A workdir belongs to one run (cm_jax/run_config.py): another run's config is refused with the workdir bitwise as
it was; settings changed on resume are allowed and recorded in config_history/; config.json is written only after the
restore; the reading modes take the run's own definition."""

import hashlib
import json
import pathlib
import shutil

import jax
import pytest

from cm_jax import checkpoint
from cm_jax import run_config
from cm_jax import train
import helpers
from test_cli import _assert_one_clear_error

EDM_CLI = '--config=configs/toy2d_edm.py:gmm'


def _edm_cli_config(**overrides):
  """What `cm_jax.main EDM_CLI` gives with helpers.TINY and `overrides`."""
  from configs import toy2d_edm  # pylint: disable=g-import-not-at-top
  c = toy2d_edm.get_config('gmm')
  c.update_from_flattened_dict(helpers._overrides(overrides))  # pylint: disable=protected-access
  return c


def _hashes(root) -> dict:
  return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(pathlib.Path(root).rglob('*')) if p.is_file()}


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """An EDM and an iCT run of 4 steps (checkpoints at 2 and 4), as the command line would have trained them."""
  root = tmp_path_factory.mktemp('runs')
  common = dict(train__num_steps=4, checkpoint__every_steps=2, checkpoint__async_save=False)
  train.train_and_evaluate(_edm_cli_config(**common), root / 'edm', jax.devices()[:1])
  train.train_and_evaluate(helpers.tiny_cli_config(**common), root / 'ict', jax.devices()[:1])
  return root


def _copy(runs, name, tmp_path):
  return pathlib.Path(shutil.copytree(runs / name, tmp_path / name))


def test_an_ict_config_on_an_edm_run_is_refused_and_the_workdir_left_bitwise(runs, tmp_path):
  edm = _copy(runs, 'edm', tmp_path)
  before = _hashes(edm)
  with pytest.raises(ValueError, match=r'objective\.name is "edm" there, "ict" here.*new --workdir') as e:
    train.train_and_evaluate(helpers.tiny_cli_config(train__num_steps=8), edm, jax.devices()[:1])
  assert '\n' not in str(e.value)
  assert _hashes(edm) == before


def test_in_process_the_refusal_comes_before_the_experiment_is_built(runs, tmp_path, monkeypatch):
  """train_and_evaluate called directly checks the workdir first: no mesh, data, teacher or restore is touched."""
  edm = _copy(runs, 'edm', tmp_path)
  built = []
  monkeypatch.setattr(train, 'Experiment', lambda *a, **k: built.append(a) or pytest.fail('built an Experiment'))
  with pytest.raises(ValueError, match=r'objective\.name is "edm" there, "ict" here'):
    train.train_and_evaluate(helpers.tiny_cli_config(train__num_steps=8), edm, jax.devices()[:1])
  assert not built


def test_an_edm_config_on_an_ict_run_is_one_line_at_start(runs, tmp_path):
  """Refused before the log file is written: the workdir is bitwise as it was."""
  ict = _copy(runs, 'ict', tmp_path)
  before = _hashes(ict)
  args = helpers.tiny_cli_args(ict, train__num_steps=8)
  result = helpers.run_main(EDM_CLI, *args[1:])
  _assert_one_clear_error(result, f'--workdir={ict} holds another run', 'objective.name is "ict" there, "edm" here',
                          'train this config in a new --workdir')
  assert result.returncode == 1
  assert _hashes(ict) == before


@pytest.mark.parametrize('key, value, shown', [
    ('optim.name', 'radam', 'optim.name is "adam" there, "radam" here'),
    ('optim.b2', 0.99, 'optim.b2 is 0.999 there, 0.99 here'),
    ('optim.grad_clip', 0.0, 'optim.grad_clip is 1.0 there, 0.0 here'),  # off: another optimiser state tree
    ('train.batch_size', 8, 'train.batch_size is 16 there, 8 here'),
    ('model.time_scale', 1.0, 'model.time_scale is 16.0 there, 1.0 here'),  # the same tree, another function
])
def test_a_changed_optimiser_batch_or_network_is_refused(runs, tmp_path, key, value, shown):
  edm = _copy(runs, 'edm', tmp_path)
  before = _hashes(edm)
  config = _edm_cli_config(train__num_steps=8, **{key.replace('.', '__'): value})
  with pytest.raises(ValueError, match='holds another run') as e:
    run_config.check(config, edm)  # what the command line runs first
  assert shown in str(e.value), str(e.value)
  # In process, the restore may refuse first (another optimiser state tree): either way nothing is written.
  with pytest.raises((ValueError, checkpoint.CheckpointError)):
    train.train_and_evaluate(config, edm, jax.devices()[:1])
  assert _hashes(edm) == before


def test_what_may_change_on_resume_compares_equal():
  old = _edm_cli_config(train__num_steps=4)
  new = _edm_cli_config(train__num_steps=9, optim__learning_rate=1e-4, optim__grad_clip=0.5, eval__num_samples=7,
                        checkpoint__every_steps=3, model__dropout=0.1, sampling__num_grid=4, data__workers=2,
                        mesh__shape__fsdp=2)
  assert run_config.differences(old, new) == []
  # A key an older config.json lacks reads as its configs/base.py default.
  saved = json.loads(old.to_json_best_effort())
  del saved['data']['caption_key']
  assert run_config.differences(saved, new) == []
  new.data.caption_key = 'caption'
  assert run_config.differences(saved, new) == [('data.caption_key', '', 'caption')]


def test_more_steps_are_allowed_and_the_history_keeps_both_configs(runs, tmp_path, capsys):
  edm = _copy(runs, 'edm', tmp_path)
  first = json.loads((edm / 'config.json').read_text())
  config = _edm_cli_config(train__num_steps=6, checkpoint__every_steps=2, checkpoint__async_save=False)
  assert int(train.train_and_evaluate(config, edm, jax.devices()[:1]).step) == 6
  history = sorted(p.name for p in (edm / 'config_history').iterdir())
  assert history == ['0000_step_0.json', '0001_step_4.json']
  assert json.loads((edm / 'config_history' / '0000_step_0.json').read_text()) == first
  newest = json.loads(config.to_json_best_effort())
  assert json.loads((edm / 'config_history' / '0001_step_4.json').read_text()) == newest
  assert json.loads((edm / 'config.json').read_text()) == newest
  assert 'settings changed on resume' in capsys.readouterr().out
  assert not list(edm.glob('.*tmp*')) and not list((edm / 'config_history').glob('.*tmp*'))


def test_a_failing_restore_leaves_config_json_as_it_was(runs, tmp_path, monkeypatch):
  """The restore's own network check (model keys not compared here) and an unreadable checkpoint: config.json and
  its history are bitwise as they were."""
  edm = _copy(runs, 'edm', tmp_path)
  before = _hashes(edm)
  monkeypatch.setattr(run_config, 'DEFINES', tuple(k for k in run_config.DEFINES if k != 'model'))
  wider = _edm_cli_config(train__num_steps=8, model__hidden=64)
  with pytest.raises(checkpoint.CheckpointError, match='written by another network'):
    train.train_and_evaluate(wider, edm, jax.devices()[:1])
  monkeypatch.undo()
  kept = lambda h: {k: v for k, v in h.items() if k == 'config.json' or k.startswith('config_history')}
  assert kept(_hashes(edm)) == kept(before)
  for f in (edm / 'checkpoints').rglob('*'):
    if f.is_file() and f.name != 'commit_success.txt' and f.parent.name != 'data' and 'state' in f.parts:
      f.write_bytes(b'garbage')
  with pytest.raises(checkpoint.CheckpointError, match='No readable checkpoint'):
    train.train_and_evaluate(_edm_cli_config(train__num_steps=8), edm, jax.devices()[:1])
  assert kept(_hashes(edm)) == kept(before)


def test_a_mesh_change_resumes_and_is_recorded_an_impossible_mesh_changes_nothing(runs, tmp_path):
  edm = _copy(runs, 'edm', tmp_path)
  before = _hashes(edm)
  bad = _edm_cli_config(train__num_steps=6, mesh__shape__data=1, mesh__shape__fsdp=3)
  with pytest.raises(ValueError):
    train.train_and_evaluate(bad, edm, jax.devices()[:2])
  assert _hashes(edm) == before
  two = _edm_cli_config(train__num_steps=6, checkpoint__async_save=False, mesh__shape__data=1, mesh__shape__fsdp=2)
  assert int(train.train_and_evaluate(two, edm, jax.devices()[:2]).step) == 6
  recorded = json.loads((edm / 'config_history' / '0001_step_4.json').read_text())
  assert recorded['mesh']['shape'] == {'data': 1, 'fsdp': 2}


def test_the_reading_modes_take_the_runs_own_definition(runs):
  passed = helpers.tiny_cli_config(eval__num_samples=5)
  config, note = run_config.for_reading(passed, runs / 'edm', 'sample')
  assert config.objective.to_dict() == {'name': 'edm', 'p_mean': -1.2, 'p_std': 1.2}
  assert config.optim.b2 == 0.999 and config.eval.num_samples == 5 and config.seed == passed.seed
  assert note.startswith(f'cm_jax: --mode=sample reads the run as {runs / "edm" / "config.json"} defines it')
  assert 'objective.name="edm" (passed: "ict")' in note and '\n' not in note
  same, quiet = run_config.for_reading(_edm_cli_config(eval__num_samples=5), runs / 'edm', 'eval')
  assert quiet == '' and same.eval.num_samples == 5


def test_mode_sample_says_it_reads_the_runs_own_config(runs, tmp_path):
  edm = _copy(runs, 'edm', tmp_path)
  result = helpers.run_main(*helpers.tiny_cli_args(edm, eval__num_samples=4, eval__steps='(1,)',
                                                   sampling__teacher_steps=2), '--mode=sample')
  assert result.returncode == 0, result.stderr[-3000:]
  notes = [l for l in result.stdout.splitlines() if l.startswith('cm_jax: --mode=sample reads the run as')]
  assert len(notes) == 1 and 'objective.name="edm" (passed: "ict")' in notes[0], result.stdout
  assert (edm / 'samples' / 'final_2_step.npz').exists()
