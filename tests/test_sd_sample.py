"""--mode=sample of a Stable Diffusion pipeline from prompts (configs/sd15_sample.py) against diffusers' own pipeline:
DDIM on the trailing grid with classifier-free guidance and a negative prompt, decoded by the VAE, from the same
initial latents."""

import jax
import numpy as np
import pytest

from cm_jax import modes
from configs import sd15_sample
import sd_fixtures

torch = pytest.importorskip('torch')
diffusers = pytest.importorskip('diffusers')

STEPS, SCALE, SIDE = 4, 3.5, 16  # the tiny VAE halves the side: 8x8 latents
PROMPTS = ('a red cube on a table', 'two dogs')


def _config(pipeline, prompts_file, negative=''):
  c = sd15_sample.sd_sampling(SIDE)
  c.latent.pipeline = str(pipeline)
  c.sampling.prompts = str(prompts_file)
  c.sampling.negative_prompt = negative
  c.sampling.teacher_steps = STEPS
  c.sampling.guidance_scale = SCALE
  c.model.dtype = 'float32'
  c.train.batch_size = c.eval.num_samples = c.sampling.num_grid = 2
  return c


def _diffusers_images(folder, noise_nhwc, family, negative):
  """diffusers' pipeline with its DDIMScheduler on cm_jax's grid (trailing, the last step to alpha = 1)."""
  pipe = diffusers.DiffusionPipeline.from_pretrained(str(folder))
  pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing='trailing',
                                                       set_alpha_to_one=True, steps_offset=0)
  kwargs = dict(height=SIDE, width=SIDE) if family == 'sdxl' else {}
  if family == 'sdxl':
    kwargs.update(original_size=(SIDE, SIDE), target_size=(SIDE, SIDE), crops_coords_top_left=(0, 0))
  with torch.no_grad():
    out = pipe(list(PROMPTS), negative_prompt=[negative] * len(PROMPTS), num_inference_steps=STEPS,
               guidance_scale=SCALE, latents=torch.from_numpy(np.transpose(noise_nhwc, (0, 3, 1, 2)).copy()),
               output_type='np', **kwargs)
  return out.images


@pytest.mark.parametrize('family,negative', [('sd15', ''), ('sd21', 'blurry'), ('sdxl', 'ugly')])
def test_prompt_sampling_equals_diffusers(tmp_path, family, negative):
  folder = sd_fixtures.write_pipeline(tmp_path / 'pipe', family)
  prompts = tmp_path / 'prompts.txt'
  prompts.write_text('\n'.join(PROMPTS) + '\n\n')  # a blank line is no prompt
  config = _config(folder, prompts, negative)
  if family == 'sd21':
    config.parameterization.prediction = 'v'
  modes.sample(config, str(tmp_path / 'run'), devices=jax.devices()[:1])
  ours = np.load(tmp_path / 'run' / 'samples' / f'final_{STEPS}_step.npz')['samples']
  rng = jax.random.fold_in(jax.random.PRNGKey(config.seed + 2), 0)  # Experiment.generate's batch 0
  noise = np.asarray(jax.random.normal(jax.random.split(rng)[0], (2, SIDE // 2, SIDE // 2, 4)))
  theirs = _diffusers_images(folder, noise, family, negative)
  assert ours.shape == theirs.shape == (2, SIDE, SIDE, 3)
  np.testing.assert_allclose(ours * 0.5 + 0.5, theirs, atol=2e-4)
  assert np.abs(ours[0] - ours[1]).max() > 1e-3  # the two prompts give two images


def test_prompt_file_errors(tmp_path):
  folder = sd_fixtures.write_pipeline(tmp_path / 'pipe', 'sd15')
  empty = tmp_path / 'empty.txt'
  empty.write_text('\n  \n')
  with pytest.raises(ValueError, match='holds no prompt'):
    modes.sample(_config(folder, empty), str(tmp_path / 'run'), devices=jax.devices()[:1])
  with pytest.raises(FileNotFoundError, match='does not exist'):
    modes.sample(_config(folder, tmp_path / 'missing.txt'), str(tmp_path / 'run'), devices=jax.devices()[:1])
  config = _config(folder, empty)
  config.parameterization.beta_end = 0.02
  with pytest.raises(ValueError, match=r'beta_end=0.02 \(scheduler: 0.012\)'):
    modes.sample(config, str(tmp_path / 'run'), devices=jax.devices()[:1])
