"""The text condition of a text-to-image run: LCM's w-embedding against diffusers' own, and caption dropout in the
train step (rate, the empty prompt's states, the kept captions' states) on the built-in digits pipeline."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cm_jax import digits_pipeline
from cm_jax import text_latents
from cm_jax.models import sd_unet
from configs import digits_t2i_ddpm


@pytest.mark.parametrize('dim', [256, 11])
def test_guidance_scale_embedding_equals_diffusers(dim):
  torch = pytest.importorskip('torch')
  diffusers = pytest.importorskip('diffusers')
  w = np.array([0.0, 2.5, 7.0, 14.0], np.float32)
  theirs = diffusers.LatentConsistencyModelPipeline.get_guidance_scale_embedding(
      None, torch.from_numpy(w), embedding_dim=dim).numpy()
  # Angles reach 1000 w = 14000 rad, where one float32 ulp of a frequency moves the angle by ~1e-3 (torch's and
  # XLA's exp differ by an ulp): a wrong factor, offset or sin/cos order moves entries by O(1).
  np.testing.assert_allclose(np.asarray(sd_unet.guidance_scale_embedding(w, dim)), theirs, atol=3e-3)
  np.testing.assert_allclose(np.asarray(sd_unet.guidance_scale_embedding(w[:2], dim)), theirs[:2], atol=3e-4)


def test_caption_dropout_replaces_captions_by_the_empty_prompt(tmp_path, monkeypatch):
  monkeypatch.setattr(digits_pipeline, 'CACHE_DIR', str(tmp_path))
  config = digits_t2i_ddpm.get_config()
  config.latent.caption_dropout = 0.3
  space, source = text_latents.build(config)
  n = 2048
  batch = source.get(np.arange(n) % len(source))
  out = jax.jit(space.prepare)(space.params, batch, jax.random.PRNGKey(3))
  text = out[text_latents.TEXT]
  empty = np.asarray(space.pipe.encode_prompt([''])[0][0])
  kept = np.asarray(space.pipe.encode_prompt(source.captions(np.arange(n) % len(source)))[0])
  hidden = np.asarray(text.hidden_states)
  dropped = np.all(np.abs(hidden - empty) < 1e-5, axis=(1, 2))
  assert abs(dropped.mean() - 0.3) < 3 * np.sqrt(0.3 * 0.7 / n)
  np.testing.assert_allclose(hidden[~dropped], kept[~dropped], atol=1e-5)
  np.testing.assert_allclose(np.asarray(text.null_hidden_states), np.broadcast_to(empty, hidden.shape), atol=1e-5)
  assert out['image'].shape == (n, 8, 8, 1) and float(jnp.abs(out['image']).max()) <= 1.0
