"""The space of a text-to-image run: a Stable Diffusion pipeline's VAE latents, conditioned on its text encoders.

config.latent.pipeline names a diffusers pipeline folder (latents.load_diffusers_pipeline). Its VAE is the run's
autoencoder (latents encoded on the fly, scaled by the VAE's scaling_factor), its tokenizers tokenise the data's
captions (a captioned source's 'caption_ids' [n, k, 77], one row per tokenizer), and inside the train step
`prepare` encodes them with the frozen text encoder(s) into a models.apply.TextCondition:

  caption ids -> with probability latent.caption_dropout the empty prompt's (the unconditional branch) -> hidden
  states (SD 1.x / 2.x: the last layer; SDXL: both towers' penultimate layers concatenated) [+ pooled, time ids]

and the empty prompt's states as the condition's unconditional branch. The run's network is the pipeline's UNet
(model.name='sd_unet', built from the pipeline's unet/config.json); its VP process must be the pipeline scheduler's.
SDXL's time ids are (H, W, 0, 0, H, W) of the data's resolution: no random crops are recorded (BUILD_NOTES).

With latent.cache the same batches come from a cache written once by --mode=encode (`cache_encoding`, through
latents.write_cache): per data record the VAE's posterior moments (unscaled mean and log-variance, float32: the step
takes latent.posterior's mean or sample of them as the on-the-fly path does; a pipeline without a VAE: the image as
stored), the text encoders' states of the record's caption (hidden states [77, D], SDXL's pooled [P]; TEXT_DTYPE)
and the caption (prompts for samples and FID). The step then runs neither the text encoders nor the VAE encoder:
a dropped caption's states are the empty prompt's, encoded once when the run starts. A record has one caption
(captioned digits: the phrasing fixed per record by data/captions.PHRASING_SEED, so a class's phrasings are spread
over its records; a TFDS sequence of captions: the first): the cache holds the states of exactly the captions the
on-the-fly run encodes, and gives its batches to TEXT_DTYPE's precision.
"""

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from cm_jax import data as data_lib
from cm_jax import digits_pipeline
from cm_jax import latents
from cm_jax.data import captions
from cm_jax.data import source as source_lib
from cm_jax.models.apply import TextCondition

CAPTION_IDS = 'caption_ids'  # a captioned batch's token ids [n, k, L]
TEXT = 'text'  # the prepared batch's TextCondition
HIDDEN, POOLED = 'hidden_states', 'pooled'  # a cached batch's text states [n, 77, D] and [n, P] (SDXL)
NULL_TEXT = 'null_text'  # params of a cached run: the empty prompt's (hidden [1, 77, D], pooled [1, P] or None)
# The cached text states' dtype: float16 keeps 11 significant bits (relative error <= 2^-11 = 4.9e-4, BUILD_NOTES
# for the measured error) over CLIP's range (|x| well under its 65504); bfloat16's 8 bits are 8x coarser.
TEXT_DTYPE = np.float16


@functools.lru_cache(maxsize=2)
def pipeline(path: str) -> latents.Pipeline:
  """The pipeline at `path`, read once per process (a run and its pipeline teacher share it)."""
  return latents.load_diffusers_pipeline(path)


def check_process(config, pipe: latents.Pipeline) -> None:
  """The run's VP process (config.parameterization) must be the scheduler's: names the keys that differ."""
  from cm_jax.parameterization import make_parameterization  # pylint: disable=g-import-not-at-top
  mine, theirs = make_parameterization(config), pipe.process
  keys = ('num_timesteps', 'beta_start', 'beta_end', 'beta_schedule', 'prediction')
  differ = [f'parameterization.{k}={getattr(mine, k, None)!r} (scheduler: {getattr(theirs, k)!r})' for k in keys
            if getattr(mine, k, None) != getattr(theirs, k)]
  if config.parameterization.name != 'vp' or differ:
    raise ValueError(f'latent.pipeline={pipe.path!r} was trained on its scheduler\'s VP process; set '
                     f"parameterization.name='vp' and {', '.join(differ) or 'the same betas'}.")


@dataclasses.dataclass
class TextLatentSpace:
  """latents.LatentSpace (on the fly or cached, scaling_factor; a PixelSpace when the pipeline has no VAE) plus the
  pipeline's text encoders; params = {'autoencoder': the VAE's or None, 'text_encoders': one tree per encoder,
  NULL_TEXT (a cached run): the empty prompt's states}."""
  latent: Any  # latents.LatentSpace, or latents.PixelSpace for a pipeline without a VAE
  pipe: latents.Pipeline
  side: int  # the data's pixel resolution (SDXL's time ids)
  caption_dropout: float
  params: Any = None

  @property
  def cached(self) -> bool:
    """Whether batches come from a latent cache: text states instead of caption ids (params hold NULL_TEXT)."""
    return NULL_TEXT in (self.params or {})

  @property
  def shape(self) -> tuple:
    return self.latent.shape

  @property
  def unet_config(self) -> dict:
    """The pipeline's UNet config: the architecture of model.name='sd_unet' (models.build_model)."""
    return self.pipe.unet_config

  def condition(self, params, ids) -> TextCondition:
    """The TextCondition of caption / prompt ids [B, k, L], the empty prompt its unconditional branch."""
    return self.condition_with_null(params, ids, jnp.asarray(self.pipe.tokenize(['']))[0])

  def condition_with_null(self, params, ids, null_ids) -> TextCondition:
    """The TextCondition of ids [B, k, L] whose unconditional branch is null_ids [k, L] (a negative prompt)."""
    hidden, pooled = self.pipe.text_features(params['text_encoders'], ids)
    return self._condition(hidden, pooled, *self.pipe.text_features(params['text_encoders'], null_ids[None]))

  def _condition(self, hidden, pooled, null_hidden, null_pooled) -> TextCondition:
    """The TextCondition of text states [B, ...] with the unconditional branch's [1, ...] (broadcast to B)."""
    batch = hidden.shape[0]
    expand = lambda a: None if a is None else jnp.broadcast_to(a, (batch,) + a.shape[1:])
    time_ids = None
    if pooled is not None:
      time_ids = jnp.broadcast_to(jnp.asarray([self.side, self.side, 0, 0, self.side, self.side], jnp.float32),
                                  (batch, 6))
    return TextCondition(hidden_states=hidden, null_hidden_states=expand(null_hidden), pooled=pooled,
                         null_pooled=expand(null_pooled), time_ids=time_ids)

  def example_condition(self, batch: int) -> TextCondition:
    """A zero TextCondition of the right shapes for `batch` examples (network initialisation)."""
    ids = jax.ShapeDtypeStruct((batch, len(self.pipe.tokenizers), 77), jnp.int32)
    shapes = jax.eval_shape(lambda p, i: self.condition_with_null(p, i, i[0]), self.params, ids)
    return jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), shapes)

  def prepare(self, params, batch, rng):
    """Latents of batch['image'] and the TextCondition of its captions, each dropped to the empty prompt with
    probability caption_dropout (drawn from `rng`): batch['caption_ids'] encoded, or (cached) the cache's states."""
    batch = dict(batch)
    rng_latent, rng_drop = jax.random.split(rng)
    drop = jax.random.bernoulli(rng_drop, self.caption_dropout, (batch['image'].shape[0],))
    text = self._cached_text(params, batch, drop) if self.cached else self._encoded_text(params, batch, drop)
    out = self.latent.prepare(params['autoencoder'], batch, rng_latent)
    out[TEXT] = jax.tree.map(jax.lax.stop_gradient, text)
    return out

  def _encoded_text(self, params, batch, drop) -> TextCondition:
    """The text encoders' TextCondition of the caption ids popped from `batch`, those `drop` marks the empty prompt."""
    ids = jnp.asarray(batch.pop(CAPTION_IDS), jnp.int32)
    null_ids = jnp.asarray(self.pipe.tokenize(['']))[0]
    return self.condition_with_null(params, jnp.where(drop[:, None, None], null_ids[None], ids), null_ids)

  def _cached_text(self, params, batch, drop) -> TextCondition:
    """The TextCondition of the cached states popped from `batch` (as float32), those `drop` marks replaced by the
    empty prompt's (params[NULL_TEXT])."""
    null_hidden, null_pooled = params[NULL_TEXT]
    pick = lambda null, states: jnp.where(drop.reshape((-1,) + (1,) * (null.ndim - 1)), null,
                                          jnp.asarray(states, jnp.float32))
    hidden = pick(null_hidden, batch.pop(HIDDEN))
    pooled = None if null_pooled is None else pick(null_pooled, batch.pop(POOLED))
    return self._condition(hidden, pooled, null_hidden, null_pooled)

  def decode(self, params, samples):
    """Images in [-1, 1] from latents, through the VAE."""
    return self.latent.decode(params['autoencoder'], samples)

  def describe(self) -> dict:
    return dict(self.latent.describe(), pipeline=str(epath.Path(self.pipe.path).resolve()))


DIGITS = 'digits'  # latent.pipeline of the built-in pixel pipeline of the captioned digits (digits_pipeline.py)
PROMPTS = 'prompts'  # data.name of a run that only samples: the prompts of sampling.prompts, no images


@dataclasses.dataclass(frozen=True)
class PromptSource:
  """The prompts of sampling.prompts as a captioned source without images: what --mode=sample of a pipeline reads
  (data.name='prompts', data.image_size the pixel resolution to sample)."""
  prompts: tuple
  shape: tuple
  dtype: Any = np.dtype(np.uint8)
  num_classes: int = 0

  def __len__(self) -> int:
    return len(self.prompts)

  def captions(self, indices) -> list:
    return [self.prompts[int(i) % len(self.prompts)] for i in indices]

  def get(self, indices):
    raise ValueError(f"data.name='{PROMPTS}' holds prompts, not images: train on a captioned data set "
                     '(captioned_digits, captioned_folder, webdataset, or TFDS with a text feature).')


def read_prompts(path) -> list[str]:
  """The prompts of a text file, one per non-empty line; an error for a missing or empty file."""
  file = epath.Path(path)
  if not file.is_file():
    raise FileNotFoundError(f'sampling.prompts={str(path)!r} does not exist: give a text file, one prompt per line.')
  lines = [line.strip() for line in file.read_text().splitlines() if line.strip()]
  if not lines:
    raise ValueError(f'sampling.prompts={str(path)!r} holds no prompt: write one prompt per line.')
  return lines


def _source(config, pipe: latents.Pipeline):
  """The run's captioned data source, tokenised by the pipeline's tokenizers (data.name='prompts': PromptSource)."""
  if config.data.name != PROMPTS:
    source = data_lib.build_source(config.data, tokenize=pipe.tokenizer())
    if not captions.is_captioned(source):
      raise ValueError(f'data.name={config.data.name!r} has no captions; a text-to-image run (latent.pipeline) reads '
                       'a captioned data set (captioned_digits, captioned_folder, webdataset, or TFDS with a text '
                       'feature).')
    return source
  if not config.sampling.prompts or config.data.image_size < 8:
    raise ValueError(f"data.name='{PROMPTS}' samples the prompts of sampling.prompts at data.image_size pixels: set "
                     f'both (got {config.sampling.prompts!r}, {config.data.image_size}).')
  side = int(config.data.image_size)
  channels = int(pipe.autoencoder.module.in_channels if pipe.autoencoder else pipe.unet_config['in_channels'])
  return PromptSource(tuple(read_prompts(config.sampling.prompts)), (side, side, channels))


def _check_latent(latent) -> None:
  """Fails on a config.latent a text-to-image run cannot have."""
  if latent.autoencoder or latent.normalization != 'scaling_factor':
    raise ValueError(f'latent.pipeline={latent.pipeline!r} brings its own VAE (encoded on the fly, or read from '
                     'latent.cache): leave latent.autoencoder empty and latent.normalization=scaling_factor.')
  if not 0.0 <= latent.caption_dropout < 1.0:
    raise ValueError(f'latent.caption_dropout={latent.caption_dropout} must be in [0, 1).')


def pipeline_path(latent) -> str:
  """The resolved folder of latent.pipeline ('digits': the built-in pipeline, written if missing)."""
  return str(digits_pipeline.ensure() if latent.pipeline == DIGITS else epath.Path(latent.pipeline).resolve())


def made_with(latent) -> dict:
  """What a text-to-image cache is made with, as its cache.json records it (latents.CacheEncoding.made_with)."""
  return {'pipeline': pipeline_path(latent), 'text_dtype': np.dtype(TEXT_DTYPE).name}


def _latent_shape(pipe: latents.Pipeline, image_shape) -> tuple:
  """The shape the run's network sees for images of `image_shape`: the VAE's latents, or the images themselves."""
  return pipe.autoencoder.module.latent_shape(image_shape) if pipe.autoencoder else tuple(image_shape)


def _compact(states) -> np.ndarray:
  """Text states as TEXT_DTYPE; an error where a value leaves its range."""
  out = np.asarray(states, np.float32).astype(TEXT_DTYPE)
  if not np.all(np.isfinite(out)):
    raise ValueError(f'A text state of magnitude {float(np.abs(np.asarray(states)).max()):.4g} does not fit '
                     f'{np.dtype(TEXT_DTYPE).name}, the latent cache\'s dtype of text states: train with the text '
                     'encoders on the fly (latent.cache=\'\').')
  return out


def cache_encoding(config) -> latents.CacheEncoding:
  """What --mode=encode writes per record of a text-to-image run's data (the module docstring): the VAE's posterior
  moments (or a pixel pipeline's image), the text states of its caption (TEXT_DTYPE), its label and caption."""
  _check_latent(config.latent)
  pipe = pipeline(pipeline_path(config.latent))
  source = _source(config, pipe)
  features = jax.jit(pipe.text_features)
  text_params = tuple(e.params for e in pipe.text_encoders)

  def encode(indices):
    batch = source.get(indices)
    hidden, pooled = features(text_params, jnp.asarray(batch[CAPTION_IDS]))
    out = {'label': batch['label'], latents.CAPTION: source.captions(indices), HIDDEN: _compact(hidden)}
    if pooled is not None:
      out[POOLED] = _compact(pooled)
    if pipe.autoencoder is None:
      out[latents.LATENT] = batch['image']
    else:
      mean, logvar = pipe.autoencoder.posterior(source_lib.to_model_range(batch['image']))
      out[latents.LATENT], out[latents.LOGVAR] = np.asarray(mean, np.float32), np.asarray(logvar, np.float32)
    return out
  return latents.CacheEncoding(source, encode, made_with(config.latent), _latent_shape(pipe, source.shape))


def build(config, mesh=None):
  """(space, captioned data source) of a run with config.latent.pipeline: the data encoded in the train step, or
  (latent.cache) the cache of --mode=encode of this pipeline and data, with the empty prompt's states."""
  latent = config.latent
  _check_latent(latent)
  pipe = pipeline(pipeline_path(latent))
  check_process(config, pipe)
  params = {'autoencoder': pipe.autoencoder and pipe.autoencoder.params,
            'text_encoders': tuple(e.params for e in pipe.text_encoders)}
  if latent.cache:
    source = latents.open_cache(latent.cache, made_with(latent), functools.partial(_latent_shape, pipe), config.data)
    image_shape = tuple(source.meta['image_shape'])
    params[NULL_TEXT] = pipe.encode_prompt([''])
  else:
    source = _source(config, pipe)
    image_shape = source.shape
  if mesh is not None:
    params = jax.device_put(params, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
  if pipe.autoencoder is None:
    space = latents.PixelSpace(image_shape)
  else:
    space = latents.LatentSpace(pipe.autoencoder, _latent_shape(pipe, image_shape), 'scaling_factor',
                                not latent.cache, latent.posterior, None, params['autoencoder'])
  return TextLatentSpace(space, pipe, int(image_shape[0]), float(latent.caption_dropout), params), source
