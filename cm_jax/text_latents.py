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
from cm_jax.models.apply import TextCondition

CAPTION_IDS = 'caption_ids'  # a captioned batch's token ids [n, k, L]
TEXT = 'text'  # the prepared batch's TextCondition


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
  """latents.LatentSpace (on the fly, scaling_factor; a PixelSpace when the pipeline has no VAE) plus the pipeline's
  text encoders; params = {'autoencoder': the VAE's or None, 'text_encoders': one tree per encoder}."""
  latent: Any  # latents.LatentSpace, or latents.PixelSpace for a pipeline without a VAE
  pipe: latents.Pipeline
  side: int  # the data's pixel resolution (SDXL's time ids)
  caption_dropout: float
  params: Any = None

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
    batch = ids.shape[0]
    hidden, pooled = self.pipe.text_features(params['text_encoders'], ids)
    null_hidden, null_pooled = self.pipe.text_features(params['text_encoders'], null_ids[None])
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
    """Latents of batch['image'] and the TextCondition of batch['caption_ids'] (each caption dropped to the empty
    prompt with probability caption_dropout, drawn from `rng`)."""
    batch = dict(batch)
    ids = jnp.asarray(batch.pop(CAPTION_IDS), jnp.int32)
    null_ids = jnp.asarray(self.pipe.tokenize(['']))[0]
    rng_latent, rng_drop = jax.random.split(rng)
    drop = jax.random.bernoulli(rng_drop, self.caption_dropout, (ids.shape[0],))
    ids = jnp.where(drop[:, None, None], null_ids[None], ids)
    out = self.latent.prepare(params['autoencoder'], batch, rng_latent)
    out[TEXT] = jax.tree.map(jax.lax.stop_gradient, self.condition_with_null(params, ids, null_ids))
    return out

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


def build(config, mesh=None):
  """(space, captioned data source) of a run with config.latent.pipeline."""
  latent = config.latent
  if latent.autoencoder or latent.cache or latent.normalization != 'scaling_factor':
    raise ValueError(f'latent.pipeline={latent.pipeline!r} brings its own VAE, encoded on the fly: leave '
                     'latent.autoencoder and latent.cache empty and latent.normalization=scaling_factor.')
  if not 0.0 <= latent.caption_dropout < 1.0:
    raise ValueError(f'latent.caption_dropout={latent.caption_dropout} must be in [0, 1).')
  pipe = pipeline(str(digits_pipeline.ensure() if latent.pipeline == DIGITS else epath.Path(latent.pipeline).resolve()))
  check_process(config, pipe)
  source = _source(config, pipe)
  params = {'autoencoder': pipe.autoencoder and pipe.autoencoder.params,
            'text_encoders': tuple(e.params for e in pipe.text_encoders)}
  if mesh is not None:
    params = jax.device_put(params, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
  if pipe.autoencoder is None:
    space = latents.PixelSpace(source.shape)
  else:
    space = latents.LatentSpace(pipe.autoencoder, pipe.autoencoder.module.latent_shape(source.shape),
                                'scaling_factor', True, latent.posterior, None, params['autoencoder'])
  return TextLatentSpace(space, pipe, int(source.shape[0]), float(latent.caption_dropout), params), source

