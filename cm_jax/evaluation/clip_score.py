"""CLIP score of a text-to-image run's samples (--mode=fid with eval.clip.model; Hessel et al. 2021):

  CLIP-S = (1/N) sum_i w max(cos(E_I(x_i), E_T(c_i)), 0),   w = 100

E_I(x): the image_embeds of a CLIP image tower (models/clip_vision.py) of the sample x, quantised to the 8-bit pixels
it is saved as, resized and cropped as CLIP's image processor does; E_T(c): the text_embeds of the CLIP text tower
with its projection (models/clip_text.py) of the sample's prompt c, tokenised by the CLIP folder's tokenizer. Hessel
et al. weight by w = 2.5; the LCM papers' tables report w = 100 (as torchmetrics' CLIPScore, which clamps the mean
cosine at 0 rather than each one: the two agree whenever no cosine is negative, as for real CLIP models and matching
prompts). Prompts are the run's (sampling.prompts or the data's captions, Experiment.prompt_texts). The samples are
streamed like FID's (evaluation/fid.py: the same batches and seeds, so they are the images FID scored) and only the
scores' moments come back; an interrupted evaluation continues from WORKDIR/fid/progress_clip_<n>_step.npz.
"""

import dataclasses
import functools
import json
from typing import Any

from etils import epath
import jax
import jax.numpy as jnp
import numpy as np

from cm_jax import console
from cm_jax import sharding
from cm_jax.evaluation import fid
from cm_jax.models import clip_text
from cm_jax.models import clip_vision

WEIGHT = 100.0  # w


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity: compiled functions are cached per scorer
class Scorer:
  """Both towers and the tokenizer of a CLIP folder."""
  image: clip_vision.ImageEncoder
  text: clip_text.TextEncoder
  tokenizer: Any
  path: str

  @property
  def params(self) -> dict:
    return {'image': self.image.params, 'text': self.text.params}

  def tokenize(self, prompts) -> np.ndarray:
    """CLIP token ids [B, max_position_embeddings] of the prompts."""
    return clip_text.tokenize(self.tokenizer, prompts, self.text.module.text_model.max_positions)

  def scores(self, params, images, ids):
    """w max(cos(E_I, E_T), 0) [B] of images [B, H, W, C] in [-1, 1] and their prompts' ids [B, L]; traceable."""
    pixels = clip_vision.preprocess(fid.quantize(images).astype(jnp.float32) / 255.0, self.image.image_size)
    unit = lambda e: e / jnp.linalg.norm(e, axis=-1, keepdims=True)
    image = unit(self.image.apply(params['image'], pixels)['image_embeds'])
    text = unit(self.text.apply(params['text'], ids)['text_embeds'])
    return WEIGHT * jnp.maximum(jnp.sum(image * text, axis=-1), 0.0)


def load(path) -> Scorer:
  """The Scorer of a transformers CLIPModel folder (config.json, model.safetensors, vocab.json + merges.txt or
  tokenizer.json), checked: its tokenizer's ids must be in its text tower's vocabulary."""
  image, text = clip_vision.load_clip(path)
  tokenizer = clip_text.load_tokenizer(path)
  vocab_size = text.module.text_model.vocab_size
  if len(tokenizer) > vocab_size:
    raise ValueError(f'The tokenizer in {path} has {len(tokenizer)} tokens, more than the {vocab_size} of its text '
                     'tower: the CLIP folder mixes two models.')
  return Scorer(image, text, tokenizer, str(path))


def make_scorer(config, exp):
  """eval.clip.model's Scorer for --mode=fid (None when eval.clip.model is empty), checked before any sampling."""
  c = config.eval.clip
  if not c.model:
    return None
  if not exp.text_conditioned:
    raise ValueError(f'eval.clip.model={c.model!r} scores text-to-image samples, but this run is not text-conditioned '
                     '(it has no latent.pipeline with a text encoder): leave eval.clip.model empty.')
  if c.num_samples == 1 or c.num_samples < 0:
    raise ValueError(f'eval.clip.num_samples={c.num_samples} must be at least 2 (0: eval.fid.num_samples).')
  return load(c.model)


@functools.lru_cache(maxsize=16)
def _score_moments_fn(exp, scorer: Scorer, batch: int, num_steps: int):
  """generated_scores' jitted batch, compiled once per (run, scorer, batch, step count)."""
  def fn(params, space_params, clip_params, rng, first, total, text, ids):
    images = exp.draw(params, space_params, rng, batch, num_steps, text)
    return fid.batch_moments(scorer.scores(clip_params, images, ids)[:, None], None, first, total)
  return jax.jit(fn, out_shardings=sharding.replicated(exp.mesh))


def generated_scores(exp, params, scorer: Scorer, num: int, num_steps: int, seed: int, batch: int,
                     progress_path=None, save_every: int = 0, teacher_params=None, what=None) -> tuple[float, float]:
  """(mean, std) of the CLIP scores of `num` samples of `params` at `num_steps` (batch i drawn from
  fold_in(PRNGKey(seed), i), as fid.generated_moments draws it) and their prompts."""
  params = exp.objective.sample_params(params, {'teacher': teacher_params})
  clip_params = jax.device_put(scorer.params, sharding.replicated(exp.mesh))
  fn = _score_moments_fn(exp, scorer, batch, num_steps)
  key = jax.random.PRNGKey(seed)
  num_batches = -(-num // batch)
  text = exp.prompt_batches(num_batches, batch)
  ids = scorer.tokenize(exp.prompt_texts(num_batches * batch))
  fingerprint = json.dumps(['clip', scorer.path, num, num_steps, seed, batch])
  moments = fid._stream(  # pylint: disable=protected-access
      lambda i: fn(params, exp.space.params, clip_params, jax.random.fold_in(key, i), i * batch, num, text(i),
                   jnp.asarray(ids[i * batch:(i + 1) * batch])),
      num_batches, progress_path, fingerprint, save_every or num_batches, what)
  mean, variance = moments.statistics()
  return float(mean[0]), float(np.sqrt(variance[0, 0]))


def fid_row(config, workdir, exp, scorer, params, num_steps: int, batch: int, teacher_params, label: str) -> dict:
  """--mode=fid's clip_score and clip_score_std at num_steps ({} without a scorer): eval.clip.num_samples samples
  (0: eval.fid.num_samples) with eval.fid's seed and batches."""
  if scorer is None:
    return {}
  f = config.eval.fid
  num = config.eval.clip.num_samples or f.num_samples
  mean, std = generated_scores(exp, params, scorer, num, num_steps, f.seed, batch,
                               epath.Path(workdir) / 'fid' / f'progress_clip_{num_steps}_step.npz', f.save_every,
                               teacher_params, what=f'CLIP score {label}')
  console.say(f'CLIP score {label}: {mean:.3f} (std {std:.3f} over {num} samples; {scorer.path}).')
  return {'clip_score': mean, 'clip_score_std': std, 'clip_num_samples': int(num)}
