"""Text-to-image latent consistency on a Stable Diffusion pipeline, end to end: LCD and LCM-LoRA train on captioned
images from a tiny diffusers pipeline, --mode=export writes what diffusers loads, and diffusers' own pipeline (with
the exported LCMScheduler, or the LoRA loaded by load_lora_weights) reproduces cm_jax's samples and outputs."""

import json

import jax
import numpy as np
import pytest
from PIL import Image

from cm_jax import experiment
from cm_jax import export
from cm_jax import modes
from cm_jax import train
from cm_jax.formats import lora as lora_format
from configs import sd15_lcm_lora
import sd_fixtures

torch = pytest.importorskip('torch')
diffusers = pytest.importorskip('diffusers')

SIDE = 16  # pixels; the tiny VAE makes 8x8x4 latents
PROMPTS = ('a small red house', 'picture number 3')


@pytest.fixture(scope='module')
def pipeline_and_data(tmp_path_factory):
  tmp = tmp_path_factory.mktemp('t2i')
  folder = sd_fixtures.write_pipeline(tmp / 'pipe', 'sd15')
  data = tmp / 'data'
  data.mkdir()
  rng = np.random.default_rng(0)
  with open(data / 'metadata.jsonl', 'w') as f:
    for i in range(8):
      Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(data / f'{i}.png')
      f.write(json.dumps({'file_name': f'{i}.png', 'text': f'picture number {i}'}) + '\n')
  prompts = tmp / 'prompts.txt'
  prompts.write_text('\n'.join(PROMPTS) + '\n')
  return folder, data, prompts


def _config(pipeline_and_data, lora: bool):
  folder, data, prompts = pipeline_and_data
  c = sd15_lcm_lora.sd_latent_consistency(SIDE, lora=lora)
  c.latent.pipeline, c.data.name, c.data.path, c.data.workers = str(folder), 'captioned_folder', str(data), 0
  c.sampling.prompts = str(prompts)
  c.latent.caption_dropout = 0.25
  c.model.dtype, c.model.remat = 'float32', False
  c.train.batch_size, c.train.num_steps, c.train.log_every = 2, 3, 1
  c.eval.num_samples, c.sampling.num_grid, c.eval.steps = 2, 2, (1, 4)
  c.checkpoint.async_save = False
  c.optim.learning_rate = 1e-3  # a visible change in 3 steps
  if lora:
    c.lora.rank, c.lora.alpha = 2, 6.0
  else:
    c.sampling.guidance_scale = 5.0
  return c


def test_lcd_export_samples_as_diffusers_lcm_pipeline(pipeline_and_data, tmp_path, monkeypatch):
  config, workdir = _config(pipeline_and_data, lora=False), str(tmp_path / 'lcd')
  devices = jax.devices()[:1]
  train.train_and_evaluate(config, workdir, devices)
  modes.sample(config, workdir, devices)
  export.run(config, workdir, devices)
  with pytest.raises(ValueError, match='exists; move it away'):
    export.run(config, workdir, devices)
  pipe = diffusers.DiffusionPipeline.from_pretrained(str(tmp_path / 'lcd' / 'export'))
  assert type(pipe.scheduler).__name__ == 'LCMScheduler' and pipe.unet.config.time_cond_proj_dim == 256
  rng = jax.random.fold_in(jax.random.PRNGKey(config.seed + 2), 0)  # Experiment.generate's batch 0
  rng_z, rng_noise = jax.random.split(rng)
  shape = (2, SIDE // 2, SIDE // 2, 4)
  nchw = lambda a: torch.from_numpy(np.transpose(np.asarray(a), (0, 3, 1, 2)).copy())
  for steps in (1, 4):
    renoise = iter([nchw(jax.random.normal(jax.random.fold_in(rng_noise, k), shape)) for k in range(steps)])
    monkeypatch.setattr(diffusers.schedulers.scheduling_lcm, 'randn_tensor', lambda *a, **k: next(renoise))
    with torch.no_grad():
      theirs = pipe(list(PROMPTS), num_inference_steps=steps, guidance_scale=5.0, output_type='np',
                    latents=nchw(jax.random.normal(rng_z, shape))).images
    ours = np.load(tmp_path / 'lcd' / 'samples' / f'final_{steps}_step.npz')['samples']
    np.testing.assert_allclose(ours * 0.5 + 0.5, theirs, atol=3e-4)


def test_lcm_lora_export_loads_in_diffusers(pipeline_and_data, tmp_path):
  config, workdir = _config(pipeline_and_data, lora=True), str(tmp_path / 'lora')
  devices = jax.devices()[:1]
  state = train.train_and_evaluate(config, workdir, devices)
  export.run(config, workdir, devices)
  exp = experiment.Experiment(config, devices)
  merged = exp.objective.sample_params(state.ema[0], {'teacher': {'unet': exp.space.pipe.unet_params}})
  assert float(np.abs(np.asarray(jax.tree.leaves(state.ema[0])[0])).max()) > 0
  pipe = diffusers.DiffusionPipeline.from_pretrained(str(pipeline_and_data[0]))
  pipe.load_lora_weights(str(tmp_path / 'lora' / 'export'), weight_name=lora_format.LORA_WEIGHTS)
  rng = np.random.default_rng(1)
  latents = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
  hidden, _ = exp.space.pipe.encode_prompt(list(PROMPTS))
  t = np.array([999, 259])
  ours = exp.space.pipe.unet_module.apply({'params': merged['unet']}, latents, t, hidden)
  with torch.no_grad():
    theirs = pipe.unet(torch.from_numpy(np.transpose(latents, (0, 3, 1, 2))), torch.from_numpy(t),
                       torch.from_numpy(np.asarray(hidden))).sample.numpy()
  base = exp.space.pipe.unet(latents, t, hidden)
  assert np.abs(np.asarray(ours) - np.asarray(base)).max() > 1e-4  # the adapters change the output
  np.testing.assert_allclose(np.transpose(theirs, (0, 2, 3, 1)), ours, rtol=1e-4, atol=1e-4)
