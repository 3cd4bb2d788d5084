"""Multi-process runs on 127.0.0.1: joining, identical training to one process, and who writes what."""

import subprocess

import jax
import numpy as np
import pytest

from cm_jax import distributed
from cm_jax import experiment
from launch import local_multiprocess
import helpers
from helpers import ROOT


def test_two_processes_of_four_devices_train_like_one_process_of_eight(tmp_path):
  """20 steps of the CLI on 2 x 4 devices: the loss curve of 1 x 8 devices, one writer, a shared checkpoint."""
  workdir, steps = tmp_path / 'run', 20
  processes = local_multiprocess.start(
      helpers.tiny_cli_args(workdir, train__num_steps=steps, checkpoint__every_steps=10), num_processes=2,
      devices_per_process=4, log_dir=tmp_path)
  codes = local_multiprocess.wait(processes, timeout=240)
  logs = [(tmp_path / f'process_{i}.log').read_text() for i in range(2)]
  assert codes == [0, 0], logs[0][-3000:] + logs[1][-3000:]

  config = helpers.tiny_cli_config(train__num_steps=steps)
  expected, state = helpers.losses(config, jax.devices()[:8], steps)
  got = helpers.scalars(workdir, 'loss')
  assert sorted(got) == list(range(1, steps + 1))
  # Gloo's cross-process sums add in another order than one process does: ~1e-7 at step 1, ~2e-5 by step 20.
  np.testing.assert_allclose([got[s] for s in range(1, steps + 1)], expected, rtol=1e-4)

  # Process 0 alone writes event files, sample grids and progress; both write their part of each checkpoint.
  assert len(list((workdir / 'tensorboard').glob('events.out.tfevents.*'))) == 1
  assert [p.name for p in (workdir / 'samples').iterdir()] == [f'step_{steps:08d}.png']
  assert f'step {steps}/{steps}' in logs[0] and 'steps/s' not in logs[1]
  assert 'Joined a run of 2 processes as process 1' in (workdir / 'logs' / 'process_1.log').read_text()
  for step in (10, 20):
    shards = sorted(p.name for p in (workdir / 'checkpoints' / str(step) / 'state').glob('ocdbt.process_*'))
    assert shards == ['ocdbt.process_0', 'ocdbt.process_1']
  # The 2-process checkpoint restores onto this process's 8 devices.
  _, restored = experiment.restore_latest(config, workdir)
  assert int(restored.step) == steps
  for a, b in zip(jax.tree.leaves(restored.params), jax.tree.leaves(state.params), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_join_from_flags_then_environment_then_cluster():
  env = {distributed.ENV_COORDINATOR: 'host0:1234', distributed.ENV_NUM_PROCESSES: '4',
         distributed.ENV_PROCESS_ID: '3'}
  assert distributed.plan(environ=env) == distributed.Plan('explicit', 'host0:1234', 4, 3)
  assert distributed.plan('10.0.0.1:99', 2, 0, environ=env) == distributed.Plan('explicit', '10.0.0.1:99', 2, 0)
  assert distributed.plan(environ={}) == distributed.Plan('single')
  slurm = {'SLURM_JOB_ID': '7', 'SLURM_NTASKS': '16'}
  assert distributed.plan(environ=slurm) == distributed.Plan('auto')
  assert distributed.plan(environ=dict(slurm, SLURM_NTASKS='1')) == distributed.Plan('single')
  assert distributed.plan(environ={distributed.ENV_MODE: 'auto'}) == distributed.Plan('auto')
  assert distributed.plan(environ=dict(env, **slurm, **{distributed.ENV_MODE: 'off'})) == distributed.Plan('single')


@pytest.mark.parametrize('kwargs, message', [
    (dict(coordinator_address='h:1', num_processes=2), 'missing: --process_id'),
    (dict(coordinator_address='h:1', num_processes=2, process_id=2), 'not in \\[0, --num_processes=2\\)'),
    (dict(environ={distributed.ENV_MODE: 'yes'}), "CM_JAX_DISTRIBUTED='yes'"),
])
def test_incomplete_join_settings_fail_clearly(kwargs, message):
  kwargs.setdefault('environ', {})
  with pytest.raises(ValueError, match=message):
    distributed.plan(**kwargs)


def test_launchers_parse_and_are_documented():
  """Each launcher is valid bash or YAML and has a worked example in the README's "Scaling out" section."""
  yaml = pytest.importorskip('yaml')
  launchers = sorted(p.name for p in (ROOT / 'launch').iterdir() if p.suffix in ('.py', '.sh', '.sbatch', '.yaml'))
  assert launchers == ['kubernetes_jobset.yaml', 'local_multiprocess.py', 'slurm_gpu.sbatch', 'tpu_vm.sh']
  for name in ('slurm_gpu.sbatch', 'tpu_vm.sh'):
    subprocess.run(['bash', '-n', str(ROOT / 'launch' / name)], check=True)
  jobset = yaml.safe_load((ROOT / 'launch' / 'kubernetes_jobset.yaml').read_text())
  assert jobset['kind'] == 'JobSet'
  scaling_out = (ROOT / 'README.md').read_text().split('## Scaling out')[1].split('\n## ')[0]
  for name in launchers:
    assert f'launch/{name}' in scaling_out, name
