"""What a run prints and where the rest goes: the console's cadence, the log file, --verbosity, the trackers (W&B in
offline mode, TensorBoard's HParams) and their bad settings. The default experiment's console is counted in
test_cli.py::test_default_experiment_end_to_end."""

import importlib.util

import jax
import ml_collections
import pytest

from cm_jax import console
from cm_jax import train
from cm_jax import writers
from helpers import event_summaries
from helpers import run_main
from helpers import tiny_config
from helpers import wandb_records


def test_console_cadence_gives_about_ten_lines_on_multiples_of_log_every():
  assert console.console_every(6000, 500) == 1000  # digits_edm: 6 lines
  assert console.console_every(16_000, 500) == 2000  # digits_ict: 8 lines
  assert console.console_every(100, 1) == 10 and console.console_every(5, 10) == 10
  assert console.console_every(400_000, 1000) == 40_000


def test_errors_are_one_line_and_their_traceback_is_in_the_log_file(tmp_path):
  quiet = run_main('--config=configs/digits_edm.py', f'--workdir={tmp_path / "a"}', '--config.model.name=nope')
  assert quiet.returncode == 1 and quiet.stderr.strip().splitlines() == [
      "cm_jax: error: Unknown model name 'nope'; known: "
      "['adm', 'autoencoder_kl', 'dit', 'mlp', 'ncsnpp', 'sd_unet', 'unet']."]
  assert 'Traceback' in (tmp_path / 'a' / 'logs' / 'process_0.log').read_text()
  verbose = run_main('--config=configs/digits_edm.py', f'--workdir={tmp_path / "b"}', '--config.model.name=nope',
                     '--verbosity=0')
  assert verbose.returncode == 1 and 'Traceback' in verbose.stderr and 'cm_jax: error: Unknown model' in verbose.stderr
  loud = run_main('--config=configs/digits_edm.py', f'--workdir={tmp_path / "c"}', '--verbosity=loud')
  assert loud.returncode == 2 and loud.stderr.startswith('cm_jax: error: bad flag') and len(
      loud.stderr.splitlines()) == 1


def _tiny_run(workdir, num_steps, **wandb):
  config = tiny_config(num_steps=num_steps)
  config.logging.wandb.update(wandb)
  config.sampling.grid_every = 4
  return train.train_and_evaluate(config, workdir, jax.devices()[:1]), config


def test_wandb_offline_logs_scalars_images_and_config_and_resumes_the_same_run(tmp_path):
  pytest.importorskip('wandb')
  _tiny_run(tmp_path, 8, mode='offline', project='cm_jax_tests')
  run_id = (tmp_path / writers.WANDB_ID_FILE).read_text().strip()
  _tiny_run(tmp_path, 12, mode='offline', project='cm_jax_tests')  # a restart: the same W&B run continues
  runs = sorted((tmp_path / 'wandb').glob('offline-run-*'))
  assert len(runs) == 2 and all(r.name.endswith(run_id) for r in runs)
  first, second = (wandb_records(r / f'run-{run_id}.wandb') for r in runs)
  history = lambda records: {
      int(dict((i.nested_key[0], i.value_json) for i in r.history.item)['_step']):
      {'/'.join(i.nested_key) for i in r.history.item} for r in records if r.WhichOneof('record_type') == 'history'}
  steps = history(first)
  assert {4, 8} <= set(steps) and 'loss' in steps[4] and 'grad_norm' in steps[8]
  assert any(key.startswith('samples/') for key in steps[8])  # the sample grid, as an image
  assert set(history(second)) >= {12} and min(history(second)) > 8  # resumed after the checkpoint at step 8
  config = {i.key: i.value_json for r in first if r.WhichOneof('record_type') == 'config' for i in r.config.update}
  assert config['optim.learning_rate'] == '0.001' and config['objective.name'] == '"ict"'


def test_tensorboard_holds_the_config_for_the_hparams_view(tmp_path):
  from tensorboardX.proto import plugin_hparams_pb2  # pylint: disable=g-import-not-at-top
  _, config = _tiny_run(tmp_path, 2)
  starts = [plugin_hparams_pb2.HParamsPluginData.FromString(v.metadata.plugin_data.content).session_start_info
            for _, tag, v in event_summaries(tmp_path, 'hparams') if tag == '_hparams_/session_start_info']
  assert len(starts) == 1
  hparams = starts[0].hparams
  assert hparams['optim.learning_rate'].number_value == config.optim.learning_rate
  assert hparams['objective.name'].string_value == 'ict' and hparams['model.depth'].number_value == 1


def test_tracker_settings_that_cannot_work_stop_at_start(monkeypatch):
  config = lambda **wandb: ml_collections.ConfigDict(dict(logging=dict(wandb=dict(
      dict(mode='off', project='p', entity=''), **wandb))))
  with pytest.raises(ValueError, match=r"logging.wandb.mode='cloud'; expected one of \('off', 'online', 'offline'\)"):
    writers.check_logging_config(config(mode='cloud'))
  with pytest.raises(ValueError, match='logging.wandb.project is empty'):
    writers.check_logging_config(config(mode='offline', project=''))
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, 'find_spec', lambda name, *a: None if name == 'wandb' else real(name, *a))
  with pytest.raises(ValueError, match=r"needs the wandb package: pip install -e '.\[wandb\]'"):
    writers.check_logging_config(config(mode='online'))
  writers.check_logging_config(config())  # off: nothing needed
