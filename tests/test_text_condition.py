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


def test_lora_merged_and_unmerged_forms_agree_in_value_and_gradient(tmp_path, monkeypatch):
  from cm_jax import latents  # pylint: disable=g-import-not-at-top
  from cm_jax.models import apply  # pylint: disable=g-import-not-at-top
  from cm_jax.models import lora  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(digits_pipeline, 'CACHE_DIR', str(tmp_path))
  pipe = latents.load_diffusers_pipeline(digits_pipeline.ensure())
  model = sd_unet.text_unet(pipe.unet_config, 'unet')
  base = {'unet': pipe.unet_params}
  paths = lora.select(base, (r'(to_q|to_v|conv1|proj_in)/kernel$',))
  adapters = lora.init(jax.random.PRNGKey(0), base, paths, 3)
  adapters = jax.tree.map(lambda a: a + 0.05 * jax.random.normal(jax.random.PRNGKey(1), a.shape), adapters)
  hidden, _ = pipe.encode_prompt(['a handwritten seven', 'the digit 1'])
  cond = apply.TextCondition(hidden_states=hidden, null_hidden_states=hidden)
  x, t = jax.random.normal(jax.random.PRNGKey(2), (2, 8, 8, 1)), jnp.array([999.0, 259.0])

  def loss(a, merged):
    out = apply.network(model, lora.LoRAParams(base, a, 2.5, merged), cond)(x, t)
    return jnp.sum(out ** 2), out

  (value_m, out_m), grad_m = jax.value_and_grad(loss, has_aux=True)(adapters, True)
  (value_u, out_u), grad_u = jax.value_and_grad(loss, has_aux=True)(adapters, False)
  np.testing.assert_allclose(out_m, out_u, rtol=1e-4, atol=1e-5)
  assert float(jnp.abs(out_m - apply.network(model, base, cond)(x, t)).max()) > 1e-3
  for gm, gu in zip(jax.tree.leaves(grad_m), jax.tree.leaves(grad_u)):
    np.testing.assert_allclose(gm, gu, rtol=1e-3, atol=1e-4 * float(jnp.abs(gu).max()))
