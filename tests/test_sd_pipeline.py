"""load_diffusers_pipeline against diffusers' own pipelines: prompt encoding, UNet output, noise schedule."""

import json

import numpy as np
import pytest

from cm_jax import latents
import sd_fixtures

torch = pytest.importorskip('torch')
diffusers = pytest.importorskip('diffusers')

PROMPTS = ['a photo of a cat', 'the handwritten digit seven, a dog and an astronaut']
FAMILIES = ('sd15', 'sd21', 'sdxl')


@pytest.fixture(scope='module', params=FAMILIES)
def pipelines(request, tmp_path_factory):
  """(cm_jax's pipeline, diffusers' pipeline) read from one tiny folder of each family."""
  folder = sd_fixtures.write_pipeline(tmp_path_factory.mktemp(request.param), request.param)
  return request.param, latents.load_diffusers_pipeline(folder), diffusers.DiffusionPipeline.from_pretrained(folder)


def _reference_prompt(family, pipe):
  with torch.no_grad():
    out = pipe.encode_prompt(PROMPTS, device='cpu', num_images_per_prompt=1, do_classifier_free_guidance=False)
  if family == 'sdxl':
    return out[0].numpy(), out[2].numpy()
  return out[0].numpy(), None


def test_encode_prompt_equals_the_diffusers_pipeline(pipelines):
  family, ours, reference = pipelines
  hidden, pooled = ours.encode_prompt(PROMPTS)
  want_hidden, want_pooled = _reference_prompt(family, reference)
  np.testing.assert_allclose(np.asarray(hidden), want_hidden, rtol=1e-4, atol=1e-5)
  if family == 'sdxl':
    assert hidden.shape[-1] == 32 + 48
    np.testing.assert_allclose(np.asarray(pooled), want_pooled, rtol=1e-4, atol=1e-5)
  else:
    assert pooled is None


def test_unet_equals_diffusers_on_encoded_prompts(pipelines):
  family, ours, reference = pipelines
  rng = np.random.default_rng(3)
  latents_nchw = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
  timesteps = np.array([7, 803])
  hidden, pooled = _reference_prompt(family, reference)
  kwargs, ours_kwargs = {}, {}
  if family == 'sdxl':
    time_ids = np.array([[64, 64, 0, 0, 64, 64], [32, 48, 4, 8, 64, 64]], np.float32)
    kwargs = dict(added_cond_kwargs=dict(text_embeds=torch.from_numpy(pooled), time_ids=torch.from_numpy(time_ids)))
    ours_kwargs = dict(pooled=pooled, time_ids=time_ids)
  with torch.no_grad():
    want = reference.unet(torch.from_numpy(latents_nchw), torch.from_numpy(timesteps), torch.from_numpy(hidden),
                          **kwargs).sample.numpy()
  got = ours.unet(latents_nchw.transpose(0, 2, 3, 1), timesteps, hidden, **ours_kwargs)
  np.testing.assert_allclose(np.asarray(got).transpose(0, 3, 1, 2), want, rtol=1e-4, atol=1e-4)
  assert np.abs(want).mean() > 1e-2  # the comparison is not between two near-zero outputs


def test_the_noise_process_is_the_schedulers(pipelines):
  family, ours, reference = pipelines
  np.testing.assert_allclose(ours.process.alphas_cumprod(), reference.scheduler.alphas_cumprod.double().numpy(),
                             rtol=1e-6)
  assert ours.process.prediction == ('v' if family == 'sd21' else 'epsilon')
  assert ours.timestep_spacing == reference.scheduler.config.timestep_spacing


def test_a_folder_without_model_index_is_refused(tmp_path):
  with pytest.raises(FileNotFoundError, match='model_index.json'):
    latents.load_diffusers_pipeline(tmp_path)


def test_a_listed_component_that_is_missing_is_named(tmp_path):
  (tmp_path / 'model_index.json').write_text(json.dumps(
      {'_class_name': 'StableDiffusionPipeline', 'vae': ['diffusers', 'AutoencoderKL'],
       'unet': ['diffusers', 'UNet2DConditionModel'], 'scheduler': ['diffusers', 'DDIMScheduler'],
       'text_encoder': ['transformers', 'CLIPTextModel'], 'tokenizer': ['transformers', 'CLIPTokenizer']}))
  with pytest.raises(FileNotFoundError, match="lists 'vae'"):
    latents.load_diffusers_pipeline(tmp_path)
