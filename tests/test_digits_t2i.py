"""The digits text-to-image path (configs/digits_t2i_*.py) on the built-in pixel pipeline (cm_jax/digits_pipeline.py):
the pipeline is a real diffusers folder that is the same bytes each time it is made, its text tower tells the
captions apart, and the teacher -> LCM-LoRA -> export chain runs."""

import hashlib

import jax
import numpy as np
import pytest

from cm_jax import digits_pipeline
from cm_jax import export
from cm_jax import latents
from cm_jax import train
from cm_jax.data import captions
from cm_jax.formats import lora as lora_format
from configs import digits_t2i_ddpm, digits_t2i_lcm_lora


def _digest(folder):
  return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(folder.rglob('*')) if p.is_file()}


def test_the_pipeline_is_deterministic_and_reads_as_diffusers_folder(tmp_path):
  digits_pipeline.write(tmp_path / 'a')
  digits_pipeline.write(tmp_path / 'b')
  assert _digest(tmp_path / 'a') == _digest(tmp_path / 'b')
  pipe = latents.load_diffusers_pipeline(tmp_path / 'a')
  assert pipe.autoencoder is None and pipe.unet_config['in_channels'] == 1
  prompts = [captions.digit_caption(7, 0), captions.digit_caption(1, 0), captions.digit_caption(7, 2)]
  ids = pipe.tokenize(prompts)
  assert ids.shape == (3, 1, 77)
  # every word of a caption is one token: <start> a handwritten seven <end> <pad>...
  assert (ids[0, 0, :5] != ids[0, 0, 4]).sum() == 4 and ids[0, 0, 4] == ids[0, 0, 5]
  hidden, pooled = pipe.encode_prompt(prompts)
  assert pooled is None and hidden.shape == (3, 77, 64)
  gap = lambda i, j: float(np.abs(np.asarray(hidden[i] - hidden[j])).max())
  assert gap(0, 1) > 1e-2 and gap(0, 2) > 1e-2  # another digit, another phrasing: other states


@pytest.fixture()
def cache(tmp_path, monkeypatch):
  monkeypatch.setattr(digits_pipeline, 'CACHE_DIR', str(tmp_path / 'cache'))
  return tmp_path


def _tiny(config):
  config.train.num_steps, config.train.batch_size, config.train.log_every = 2, 8, 1
  config.eval.num_samples, config.sampling.num_grid, config.eval.proxy = 8, 8, False
  config.sampling.teacher_steps = 4
  config.checkpoint.async_save = False
  return config


def test_teacher_lcm_lora_and_export(cache):
  devices = jax.devices()[:1]
  teacher = str(cache / 'ddpm')
  state = train.train_and_evaluate(_tiny(digits_t2i_ddpm.get_config()), teacher, devices)
  assert int(state.step) == 2
  config = _tiny(digits_t2i_lcm_lora.get_config())
  config.teacher.workdir = teacher
  workdir = cache / 'lora'
  train.train_and_evaluate(config, str(workdir), devices)
  export.run(config, str(workdir), devices)
  adapters, scale = lora_format.read_lora(workdir / 'export', latents.load_diffusers_pipeline(
      digits_pipeline.ensure()).unet_params)
  assert scale == pytest.approx(1.0) and len(jax.tree.leaves(adapters)) > 10


def test_caption_agreement_counts_samples_classified_as_their_prompts_digit():
  from cm_jax.evaluation import report  # pylint: disable=g-import-not-at-top

  class Proxy:
    def classify(self, images):
      assert images.shape == (4, 8, 8, 1)
      return np.array([7, 1, 2, 3])

  class Run:
    def generate(self, params, num, num_steps, seed, teacher_params=None):
      return np.zeros((num, 8, 8, 1), np.float32)

    def prompt_texts(self, num):
      return [captions.digit_caption(d, p) for d, p in ((7, 0), (1, 3), (7, 5), (3, 1))][:num]

  assert report.caption_agreement(Proxy(), Run(), None, 4, 1, 0) == 75.0
