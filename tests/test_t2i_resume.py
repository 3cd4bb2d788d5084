"""Exact resume of a text-to-image run after kill -9 (issue 23): `python -m cm_jax.main` of configs/digits_t2i_ddpm.py
on captioned webdataset shards with caption dropout 0.5, killed with SIGKILL once a checkpoint is on disk and run
again to the end, against the same command run in one go: the train state (parameters, EMA, Adam's moments, step),
the data position and the per-step losses, bit for bit. The resumed run must read the records (an epoch ends inside
a batch) and draw the dropout of every step where the killed run would have.

Shrunk to seconds a step: a one-level RGB UNet in the built-in digits pipeline's place (digits_pipeline.UNET), 4
images a batch, a checkpoint every 3 of 12 steps; the resumed and the uninterrupted run load the killed run's
compiled programs from a persistent compilation cache."""

import io
import signal
import tarfile

import chex
import jax
import numpy as np
from PIL import Image
import pytest

from cm_jax import checkpoint
from cm_jax import digits_pipeline
from cm_jax import experiment
from cm_jax.data import captions
from configs import digits_t2i_ddpm
import helpers

STEPS, EVERY = 12, 3
SHARDS = (6, 5)  # samples per .tar shard: 11 records, so that epochs end inside batches of 4
RGB_UNET = dict(digits_pipeline.UNET, in_channels=3, out_channels=3, block_out_channels=[16],
                down_block_types=['CrossAttnDownBlock2D'], up_block_types=['CrossAttnUpBlock2D'])


def _write_shards(folder) -> None:
  """webdataset shards of SHARDS samples: KEY.png (12x10 RGB, cropped to 8x8 by the source) and KEY.txt."""
  folder.mkdir()
  rng, key = np.random.default_rng(0), 0
  for shard, size in enumerate(SHARDS):
    with tarfile.open(folder / f'{shard:05d}.tar', 'w') as tar:
      for _ in range(size):
        png = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(png, format='png')
        caption = captions.digit_caption(key % 10, key % len(captions.PHRASINGS)).encode()
        for extension, data in (('png', png.getvalue()), ('txt', caption)):
          member = tarfile.TarInfo(f'{key:04d}.{extension}')
          member.size = len(data)
          tar.addfile(member, io.BytesIO(data))
        key += 1


OVERRIDES = {'data.name': 'webdataset', 'data.image_size': 8, 'latent.caption_dropout': 0.5, 'train.batch_size': 4,
             'train.num_steps': STEPS, 'train.log_every': 1, 'checkpoint.every_steps': EVERY, 'sampling.num_grid': 2,
             'sampling.teacher_steps': 2, 'eval.num_samples': 2, 'eval.proxy': False}


def _final(exp, workdir) -> tuple:
  """(state, data position) of the run's newest checkpoint, and its losses {step: loss} in TensorBoard."""
  ckpt = checkpoint.Checkpointer(workdir)
  state, position = ckpt.restore(exp.abstract_state)
  ckpt.close()
  return jax.device_get(state), position, helpers.scalars(workdir, 'loss')


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """{'resumed', 'uninterrupted': _final of each run, 'killed_at': the newest checkpoint when the run was killed}.

  The uninterrupted run is a subprocess too: the pytest process (8 simulated devices) computes the same steps to
  other last bits. It and the resumed run start once the killed run is gone, and load its compiled programs."""
  root = tmp_path_factory.mktemp('t2i_resume')
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(digits_pipeline, 'UNET', RGB_UNET)
    digits_pipeline.write(root / 'pipeline')
    _write_shards(root / 'shards')
    overrides = dict(OVERRIDES, **{'data.path': str(root / 'shards'), 'latent.pipeline': str(root / 'pipeline')})
    patch.setenv('JAX_COMPILATION_CACHE_DIR', str(root / 'compiled'))  # read by the subprocesses only
    start = lambda name, workdir: helpers.start_main(
        ['--config=configs/digits_t2i_ddpm.py', f'--workdir={workdir}',
         *(f'--config.{k}={v}' for k, v in overrides.items())], root / f'{name}.log')
    run, processes, out = root / 'run', {}, {}
    try:
      processes['killed'] = start('killed', run)
      helpers.wait_until(lambda: helpers.saved_steps(run), processes.values(), timeout=300, what='a checkpoint')
      processes['killed'].kill()
      assert processes['killed'].wait() == -signal.SIGKILL
      out['killed_at'] = max(helpers.saved_steps(run))
      assert out['killed_at'] < STEPS
      processes['resumed'] = start('resumed', run)
      processes['uninterrupted'] = start('uninterrupted', root / 'uninterrupted')
      config = digits_t2i_ddpm.get_config()
      config.update_from_flattened_dict(overrides)
      exp = experiment.Experiment(config, jax.devices()[:1])
      for name, workdir in (('resumed', run), ('uninterrupted', root / 'uninterrupted')):
        assert processes[name].wait(timeout=300) == 0, (root / f'{name}.log').read_text()[-3000:]
        out[name] = _final(exp, workdir)
    finally:
      for process in processes.values():
        process.kill()
  assert f'Resuming from step {out["killed_at"]} ' in (root / 'resumed.log').read_text()
  return out


def test_the_resumed_run_ends_in_the_uninterrupted_runs_state_at_its_data_position(runs):
  """The last checkpoints of both runs hold the same state bit for bit (parameters, EMA, Adam's moments, step) and
  data position STEPS; the resumed run logged the uninterrupted run's losses, which moved."""
  (state, position, logged), (expected_state, expected_position, expected) = runs['resumed'], runs['uninterrupted']
  assert position == expected_position == {'position': STEPS, 'seed': 0}
  chex.assert_trees_all_equal(state, expected_state)
  assert sorted(expected) == list(range(1, STEPS + 1))
  after = range(runs['killed_at'] + 1, STEPS + 1)
  assert [logged.get(s) for s in after] == [expected[s] for s in after]
  assert np.ptp(list(expected.values())) > 0.05


def test_the_loss_history_up_to_the_checkpoint_survives_the_kill(runs):
  """Every step's loss is in the run's TensorBoard events once, the uninterrupted run's: those up to the checkpoint
  the resumed run started from were written by the killed run."""
  assert runs['resumed'][2] == runs['uninterrupted'][2]
