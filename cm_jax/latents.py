"""The latent space: a latent run is a pixel run whose data and samples pass through a frozen autoencoder.

* The autoencoder is a diffusers `AutoencoderKL` folder (`config.json` + `diffusion_pytorch_model.safetensors`, e.g. a
  Stable-Diffusion VAE) or a cm_jax autoencoder run, which exports itself in that format to `WORKDIR/autoencoder`.
  `load_diffusers_autoencoder(path)` reads one: PyTorch names become Flax paths ('down_blocks.0' -> 'down_blocks_0',
  the older 'query/key/value/proj_attn' -> 'to_q/to_k/to_v/to_out_0'), conv kernels OIHW -> HWIO, linear weights
  transposed, norm 'weight' -> 'scale'. No PyTorch is needed.
* Latents are the posterior mean (or a sample) of the encoder, normalised (`latent.normalization`):
  'scaling_factor' z = (mean - shift_factor) * scaling_factor (LCM, Stable Diffusion), or with the data set's
  statistics of a latent cache z = (mean - mu) / s * 0.5 per channel ('per_channel') or per element ('per_element',
  improved latent CT's reference code).
* Encoded on the fly by the frozen encoder inside the train step (LCM), or once by `--mode=encode` into an ArrayRecord
  cache with its statistics (`write_cache`; improved latent CT), read back as the run's data set. A record holds what
  the run's space reads (`CacheEncoding`): the posterior mean and label; for a text-to-image run (text_latents.py)
  also the posterior log-variance, the text encoders' states and the caption.
* Samples are decoded (and clipped to [-1, 1]) for grids, the digits proxy and FID.
"""

import dataclasses
import json
from typing import Any

from absl import logging
from etils import epath
import flax
import jax
import jax.numpy as jnp
import numpy as np

from cm_jax import data as data_lib
from cm_jax import parameterization
from cm_jax import workdir as workdir_lib
from cm_jax.data import captions
from cm_jax.data import source as source_lib
from cm_jax.formats import diffusers as diffusers_format
from cm_jax.formats import lora as lora_format
from cm_jax.models import clip_text
from cm_jax.models import lora as lora_lib
from cm_jax.models import sd_unet
from cm_jax.models.autoencoder import AutoencoderKL

CONFIG_FILE = diffusers_format.CONFIG_FILE
RUN_EXPORT = 'autoencoder'  # where a cm_jax autoencoder run exports itself
NORMALIZATIONS = ('scaling_factor', 'per_channel', 'per_element')
POSTERIORS = ('mean', 'sample')
_CACHE_JSON = 'cache.json'
_CACHE_STATS = 'stats.npz'
_STATS = ('element_mean', 'element_std', 'channel_mean', 'channel_std')
# the data keys a cache records (those the config has) and is checked on
_CACHE_DATA = ('name', 'split', 'path', 'image_size', 'num_records', 'caption_key', 'resample')


# ----------------------------------------------------------------------------------------------------------
# The diffusers AutoencoderKL format: config.json and PyTorch-named tensors (converted in formats/diffusers.py).
# ----------------------------------------------------------------------------------------------------------
def module_from_config(config: dict, where: str) -> AutoencoderKL:
  """The AutoencoderKL a diffusers config.json describes; an error for another model type or unsupported blocks."""
  if config.get('_class_name') != 'AutoencoderKL':
    raise ValueError(f'{where} describes a {config.get("_class_name")!r}, not an AutoencoderKL (the KL autoencoder of '
                     'latent diffusion).')
  widths = tuple(config.get('block_out_channels', (64,)))
  for key, block in (('down_block_types', 'DownEncoderBlock2D'), ('up_block_types', 'UpDecoderBlock2D')):
    types = tuple(config.get(key, (block,) * len(widths)))
    if types != (block,) * len(widths):
      raise ValueError(f'{where}: {key}={types}; cm_jax reads {block} blocks only, one per block_out_channels entry.')
  if config.get('act_fn', 'silu') != 'silu' or config.get('in_channels', 3) != config.get('out_channels', 3):
    raise ValueError(f'{where}: cm_jax reads act_fn "silu" with in_channels = out_channels.')
  return AutoencoderKL(
      in_channels=int(config.get('in_channels', 3)), block_out_channels=widths,
      layers_per_block=int(config.get('layers_per_block', 1)), latent_channels=int(config.get('latent_channels', 4)),
      norm_num_groups=int(config.get('norm_num_groups', 32)),
      mid_block_add_attention=bool(config.get('mid_block_add_attention', True)),
      use_quant_conv=bool(config.get('use_quant_conv', True)),
      use_post_quant_conv=bool(config.get('use_post_quant_conv', True)))


def config_of(module: AutoencoderKL, scaling_factor: float, sample_size: int, shift_factor=None) -> dict:
  """The diffusers config.json of an AutoencoderKL."""
  levels = len(module.block_out_channels)
  return {'_class_name': 'AutoencoderKL', 'in_channels': module.in_channels, 'out_channels': module.in_channels,
          'down_block_types': ['DownEncoderBlock2D'] * levels, 'up_block_types': ['UpDecoderBlock2D'] * levels,
          'block_out_channels': list(module.block_out_channels), 'layers_per_block': module.layers_per_block,
          'act_fn': 'silu', 'latent_channels': module.latent_channels, 'norm_num_groups': module.norm_num_groups,
          'sample_size': sample_size, 'scaling_factor': scaling_factor, 'shift_factor': shift_factor,
          'latents_mean': None, 'latents_std': None, 'force_upcast': True,
          'use_quant_conv': module.use_quant_conv, 'use_post_quant_conv': module.use_post_quant_conv,
          'mid_block_add_attention': module.mid_block_add_attention}


class Autoencoder:
  """A frozen AutoencoderKL with its parameters and latent scaling.

  encode(images NHWC in [-1, 1]) -> (posterior mean - shift_factor) * scaling_factor; decode(latents) -> images.
  `moments(params, images)` and `decode_raw(params, raw)` are the pure functions the train step and samplers use.
  """

  def __init__(self, module: AutoencoderKL, params, scaling_factor: float, shift_factor, path: str):
    self.module, self.params, self.path = module, params, path
    self.scaling_factor, self.shift_factor = float(scaling_factor), float(shift_factor or 0.0)
    self._encode = jax.jit(self.moments)
    self._decode = jax.jit(self.decode_raw)

  def moments(self, params, images):
    """(mean, logvar) of q(z | images), unscaled."""
    return self.module.apply({'params': params}, images, method=AutoencoderKL.encode)

  def decode_raw(self, params, raw):
    """Images from unscaled latents."""
    return self.module.apply({'params': params}, raw, method=AutoencoderKL.decode)

  def posterior(self, images):
    """(mean, logvar) of q(z | images), unscaled, with this autoencoder's parameters (jit-compiled)."""
    return self._encode(self.params, jnp.asarray(images, jnp.float32))

  def encode(self, images):
    """Scaled latent means (mean - shift_factor) * scaling_factor of images [B, H, W, C] in [-1, 1]."""
    return (self.posterior(images)[0] - self.shift_factor) * self.scaling_factor

  def decode(self, latents):
    """Images [B, H, W, C] from scaled latents."""
    return self._decode(self.params, jnp.asarray(latents, jnp.float32) / self.scaling_factor + self.shift_factor)


def load_diffusers_autoencoder(path) -> Autoencoder:
  """The AutoencoderKL of a diffusers folder (config.json + diffusion_pytorch_model.safetensors)."""
  folder = epath.Path(path)
  config_path = folder / CONFIG_FILE
  if not config_path.exists():
    raise FileNotFoundError(f'{config_path} does not exist: a diffusers AutoencoderKL folder holds {CONFIG_FILE} and '
                            f'{diffusers_format.DIFFUSERS_STEM}.safetensors (save_pretrained(..., safe_serialization=True) writes them).')
  config = diffusers_format.read_json(config_path)
  module = module_from_config(config, str(config_path))
  state_dict, where = diffusers_format.read_weights(folder, diffusers_format.DIFFUSERS_STEM)
  side = 2 * module.downsampling  # parameter shapes do not depend on the image size
  abstract = jax.eval_shape(module.init, jax.random.PRNGKey(0), jnp.zeros((1, side, side, module.in_channels)))
  params = diffusers_format.from_diffusers(state_dict, abstract['params'], where)
  bad = [k for k, v in flax.traverse_util.flatten_dict(params, sep='/').items() if not np.all(np.isfinite(v))]
  if bad:
    raise ValueError(f'The autoencoder {folder} has non-finite (NaN or inf) weights in {len(bad)} tensors, first '
                     f'{bad[0]} ({where}): it is not usable; export or train it again, or choose another '
                     'latent.autoencoder.')
  return Autoencoder(module, params, config.get('scaling_factor', 0.18215), config.get('shift_factor'), str(folder))


def load_autoencoder(path) -> Autoencoder:
  """A diffusers AutoencoderKL folder, or a cm_jax autoencoder run (read from its export `<run>/autoencoder`)."""
  folder = epath.Path(path)
  if (folder / RUN_EXPORT / CONFIG_FILE).exists():
    return load_diffusers_autoencoder(folder / RUN_EXPORT)
  if (folder / PIPELINE_INDEX).exists() and not (folder / CONFIG_FILE).exists():
    raise ValueError(f'{path} is a diffusers pipeline, not an autoencoder folder: its autoencoder is {folder / "vae"} '
                     f'(set latent.autoencoder={folder / "vae"}), or give the pipeline as latent.pipeline.')
  objective = _run_objective(folder)
  if objective not in (None, 'autoencoder'):
    raise ValueError(f'{path} is a cm_jax {objective!r} run, not an autoencoder run: latent.autoencoder names a '
                     'diffusers AutoencoderKL folder or the workdir of an autoencoder run (objective.name='
                     "'autoencoder', e.g. configs/digits_autoencoder.py).")
  if (folder / 'checkpoints').exists():
    raise FileNotFoundError(f'The autoencoder run {path} has no export in {folder / RUN_EXPORT}: it is written when '
                            'the run finishes (run its training command again to finish it).')
  return load_diffusers_autoencoder(folder)


def _run_objective(folder: epath.Path):
  """The objective.name in a cm_jax run's config.json (None when the folder holds no such file)."""
  try:
    return json.loads((folder / CONFIG_FILE).read_text())['objective']['name']
  except (OSError, ValueError, KeyError, TypeError):
    return None


def export_diffusers(folder, module: AutoencoderKL, params, scaling_factor: float, sample_size: int) -> None:
  """Writes `params` as a diffusers AutoencoderKL folder (config.json + safetensors), config last."""
  diffusers_format.write_model(folder, jax.device_get(params), config_of(module, scaling_factor, sample_size))


# ----------------------------------------------------------------------------------------------------------
# Whole diffusers pipelines: model_index.json, the VAE, the UNet, the text encoder(s) and tokenizer(s), the scheduler.
# ----------------------------------------------------------------------------------------------------------
PIPELINE_INDEX = diffusers_format.PIPELINE_INDEX
_SCHEDULER_CONFIG = diffusers_format.SCHEDULER_CONFIG
_PREDICTIONS = {'epsilon': 'epsilon', 'v_prediction': 'v', 'sample': 'sample'}


@dataclasses.dataclass
class Pipeline:
  """A Stable Diffusion pipeline (SD 1.x / 2.x: one CLIP text tower; SDXL: two, and the pooled text_time input).

  Attributes:
    autoencoder: the VAE (latents.Autoencoder), or None for a pipeline of pixels (model_index.json's vae null).
    unet_module, unet_params, unet_config: the UNet2DConditionModel, its parameters and its diffusers config.
    text_encoders, tokenizers: one per `text_encoder*` / `tokenizer*` component, in the pipeline's order.
    process: the scheduler's noise process as the project's VP (betas, num_train_timesteps, prediction type).
    timestep_spacing: the scheduler's, for the record (cm_jax's DDIM and LCM samplers use the trailing grid).
  """
  path: str
  autoencoder: Autoencoder
  unet_module: Any
  unet_params: Any
  unet_config: dict
  text_encoders: tuple
  tokenizers: tuple
  process: Any
  timestep_spacing: str
  _encode: Any = dataclasses.field(default=None, repr=False)

  @property
  def pooled(self) -> bool:
    """Whether the UNet reads a pooled text embedding and time ids (SDXL's addition_embed_type='text_time')."""
    return self.unet_config.get('addition_embed_type') == 'text_time'

  def tokenize(self, prompts) -> np.ndarray:
    """int32 [n, k, 77]: the prompts' ids from each of the k tokenizers (padded / truncated as diffusers does)."""
    return self.tokenizer()(list(prompts))

  def tokenizer(self):
    """tokenize(prompts) -> int32 [n, k, 77], picklable (data.captions.caption_tokenizer: what data workers get)."""
    return captions.caption_tokenizer(self.tokenizers)

  def text_features(self, params, ids):
    """(hidden_states [B, 77, D], pooled [B, P] or None) of ids [B, k, 77] with the encoders' `params` (one tree per
    encoder): the pure function of `encode_prompt`, for use inside jitted steps.

    SD 1.x / 2.x: the text tower's last hidden state (after its final LayerNorm). SDXL: each tower's penultimate
    hidden state (before the final LayerNorm), concatenated on the feature axis; pooled = the last tower's projected
    pooled output (text_embeds).
    """
    hidden, pooled = [], None
    for i, (encoder, p) in enumerate(zip(self.text_encoders, params)):
      out = encoder.apply(p, ids[:, i])
      hidden.append(out['hidden_states'][-2] if self.pooled else out['last_hidden_state'])
      pooled = out['text_embeds'] if out['text_embeds'] is not None else out['pooled']
    return jnp.concatenate(hidden, axis=-1), (pooled if self.pooled else None)

  def encode_prompt(self, prompts):
    """(hidden_states [B, 77, D], pooled [B, P] or None) as the family's diffusers pipeline builds them
    (`text_features` of the prompts' ids)."""
    if self._encode is None:
      self._encode = jax.jit(self.text_features)
    return self._encode(tuple(e.params for e in self.text_encoders), jnp.asarray(self.tokenize(prompts)))

  def unet(self, latents, timesteps, hidden_states, pooled=None, time_ids=None, timestep_cond=None):
    """The UNet's raw prediction (epsilon or v, as `process.prediction`) for NHWC latents and integer timesteps [B]."""
    added = dict(text_embeds=pooled, time_ids=time_ids) if self.pooled else None
    if self.pooled and (pooled is None or time_ids is None):
      raise ValueError(f'The UNet of {self.path} reads SDXL\'s pooled text embedding and time ids; pass both.')
    return self.unet_module.apply({'params': self.unet_params}, latents, timesteps, hidden_states, added_cond=added,
                                  timestep_cond=timestep_cond)


def process_from_scheduler(config: dict, where: str) -> parameterization.VP:
  """The VP process of a diffusers scheduler config (DDPM/DDIM/PNDM/LCM/Euler...: betas and the prediction type)."""
  prediction = config.get('prediction_type', 'epsilon')
  if prediction not in _PREDICTIONS:
    raise ValueError(f'{where}: prediction_type={prediction!r}; cm_jax reads {sorted(_PREDICTIONS)}.')
  if config.get('trained_betas') is not None:
    raise ValueError(f'{where} lists trained_betas; cm_jax reads the linear and scaled_linear beta schedules.')
  return parameterization.VP(num_timesteps=int(config.get('num_train_timesteps', 1000)),
                             beta_start=float(config.get('beta_start', 0.0001)),
                             beta_end=float(config.get('beta_end', 0.02)),
                             beta_schedule=config.get('beta_schedule', 'linear'), prediction=_PREDICTIONS[prediction])


def load_diffusers_pipeline(path, lora=None, lora_scale: float = 1.0) -> Pipeline:
  """Reads a diffusers Stable Diffusion pipeline folder (SD 1.x, 2.x, SDXL) into JAX; no PyTorch needed.

  Args:
    path: the pipeline folder (model_index.json and its components).
    lora: None, or a diffusers-format UNet LoRA (a .safetensors, or a folder holding pytorch_lora_weights.safetensors;
      PEFT, older diffusers or kohya keys) merged into the UNet parameters: W + lora_scale (alpha / r) A B.
    lora_scale: the LoRA's weight (diffusers' cross_attention_kwargs={'scale': ...}).

  Raises:
    FileNotFoundError: no model_index.json, or a component it lists is missing.
    ValueError: a component of another class, a corrupt or mis-shaped weights file, an unreadable scheduler config,
      a LoRA key of a module the UNet lacks (named).
  """
  folder = epath.Path(path)
  if not (folder / PIPELINE_INDEX).exists():
    raise FileNotFoundError(f'{folder} has no {PIPELINE_INDEX}: a diffusers pipeline folder is what '
                            'DiffusionPipeline.save_pretrained writes (vae/, unet/, text_encoder/, tokenizer/, ...).')
  index = diffusers_format.read_json(folder / PIPELINE_INDEX)
  components = {name: spec for name, spec in index.items() if not name.startswith('_') and isinstance(spec, list)}
  for needed in ('unet', 'scheduler'):
    if needed not in components or components[needed][0] is None:
      raise ValueError(f'{folder / PIPELINE_INDEX} lists no {needed!r} component; cm_jax reads Stable Diffusion '
                       'pipelines (vae, unet, text_encoder(s), tokenizer(s), scheduler).')
  has_vae = 'vae' in components and components['vae'][0] is not None  # none: a pixel-space pipeline
  for name, spec in components.items():
    if spec[0] is not None and not (folder / name).exists():
      raise FileNotFoundError(f'{folder / PIPELINE_INDEX} lists {name!r} but {folder / name} does not exist.')
  encoders = sorted(n for n in components if n.startswith('text_encoder') and components[n][0] is not None)
  tokenizers = sorted(n for n in components if n.startswith('tokenizer') and components[n][0] is not None)
  if not encoders or len(encoders) != len(tokenizers):
    raise ValueError(f'{folder}: text encoders {encoders} and tokenizers {tokenizers} do not pair up.')
  unet_module, unet_params, unet_config = sd_unet.load_unet(folder / 'unet')
  if lora is not None:
    adapters, scale = lora_format.read_lora(lora, unet_params)
    unet_params = lora_lib.merge(unet_params, (adapters, lora_scale * scale))
  scheduler = folder / _SCHEDULER_CONFIG
  schedule = diffusers_format.read_json(scheduler)
  autoencoder = load_diffusers_autoencoder(folder / 'vae') if has_vae else None
  return Pipeline(path=str(folder), autoencoder=autoencoder, unet_module=unet_module,
                  unet_params=unet_params, unet_config=unet_config,
                  text_encoders=tuple(clip_text.load_text_encoder(folder / n) for n in encoders),
                  tokenizers=tuple(clip_text.load_tokenizer(folder / n) for n in tokenizers),
                  process=process_from_scheduler(schedule, str(scheduler)),
                  timestep_spacing=schedule.get('timestep_spacing', 'leading'))


# ----------------------------------------------------------------------------------------------------------
# The latent cache of --mode=encode.
# ----------------------------------------------------------------------------------------------------------
LATENT, LOGVAR, CAPTION = 'latent', 'logvar', 'caption'  # record fields: the batch's image, its log-variance, text
_PATH_KEYS = ('autoencoder', 'pipeline')  # made_with keys compared as resolved paths


@dataclasses.dataclass(frozen=True)
class CacheEncoding:
  """What --mode=encode writes of a data source: encode(indices) -> {field: [n, ...]} of the records at `indices`
  ('latent': what the space reads as the batch's image, e.g. the unscaled posterior mean; 'label'; optionally
  CAPTION, a list of strings, and more arrays: a text-to-image cache's 'logvar' and text states), `made_with` the
  models that encode them as cache.json records them (a cache made with others is refused), `shape` the latent's."""
  source: Any
  encode: Any
  made_with: dict
  shape: tuple


def _autoencoder_made_with(autoencoder) -> dict:
  """What an autoencoder's latent cache is made with, as cache.json records it: {'autoencoder': its path}."""
  return {'autoencoder': str(autoencoder.path)}


def autoencoder_encoding(config) -> CacheEncoding:
  """The unscaled posterior means (float32) of config.data under config.latent.autoencoder, with their labels."""
  source = data_lib.build_source(config.data)
  autoencoder = load_autoencoder(config.latent.autoencoder)

  def encode(indices):
    batch = source.get(indices)
    mean = autoencoder.posterior(source_lib.to_model_range(batch['image']))[0]
    return {LATENT: np.asarray(mean, np.float32), 'label': batch['label']}
  return CacheEncoding(source, encode, _autoencoder_made_with(autoencoder),
                       autoencoder.module.latent_shape(source.shape))


def cache_encoding(config) -> CacheEncoding:
  """The encoding of config's cache: a text-to-image run's (latent.pipeline; text_latents.cache_encoding), else the
  autoencoder's."""
  if config.latent.get('pipeline'):
    from cm_jax import text_latents  # pylint: disable=g-import-not-at-top
    return text_latents.cache_encoding(config)
  return autoencoder_encoding(config)


def made_with(config) -> dict:
  """What encodes config's cache, as cache.json records it (CacheEncoding.made_with), without reading the data."""
  if config.latent.get('pipeline'):
    from cm_jax import text_latents  # pylint: disable=g-import-not-at-top
    return text_latents.made_with(config.latent)
  return _autoencoder_made_with(load_autoencoder(config.latent.autoencoder))


def _record(fields: dict) -> bytes:
  """One record's msgpack: arrays as they are, numpy scalars as Python numbers."""
  return flax.serialization.msgpack_serialize({k: v.item() if isinstance(v, np.generic) else v
                                               for k, v in fields.items()})


class LatentCacheSource:
  """The records of a latent cache (data/source.py): get -> {'image': the records' 'latent' (posterior means,
  unscaled, or a pixel pipeline's images) [n, ...], 'label' and the other arrays they hold (a text-to-image cache's
  'logvar' and text states)}; `captions(indices)` -> a text-to-image cache's captions."""

  def __init__(self, directory):
    from array_record.python import array_record_data_source  # pylint: disable=g-import-not-at-top
    self.directory = epath.Path(directory)
    meta = self.directory / _CACHE_JSON
    if not meta.exists():
      raise FileNotFoundError(f'No latent cache in {self.directory} ({_CACHE_JSON} is missing): write it with '
                              '--mode=encode first.')
    rewrite = f'delete {self.directory} and write the cache again with --mode=encode.'
    try:
      self.meta = json.loads(meta.read_text())
      self.shape, self.num_classes = tuple(self.meta['shape']), int(self.meta['num_classes'])
      shards = [self.directory / name for name in self.meta['shards']]
      self.dtype = np.dtype(self.meta.get('fields', {}).get(LATENT, 'float32'))
    except (ValueError, KeyError, TypeError) as e:
      raise ValueError(f'{meta} is not the index of a latent cache ({type(e).__name__}: {e}): {rewrite}') from e
    try:
      with (self.directory / _CACHE_STATS).open('rb') as f:
        stats = np.load(f, allow_pickle=False)
        self.stats = {k: stats[k] for k in _STATS}
    except (OSError, ValueError, KeyError, EOFError) as e:
      raise ValueError(f'{self.directory / _CACHE_STATS} does not hold the latent statistics ({type(e).__name__}: '
                       f'{e}): {rewrite}') from e
    try:
      self._records = array_record_data_source.ArrayRecordDataSource([str(s) for s in shards])
    except (OSError, RuntimeError, ValueError) as e:  # name the shard: ArrayRecord's message does not
      for shard in shards:
        try:
          array_record_data_source.ArrayRecordDataSource([str(shard)])
        except (OSError, RuntimeError, ValueError) as shard_error:
          raise ValueError(f'The shard {shard} of the latent cache is unreadable ({shard_error}): {rewrite}') from e
      raise

  def __len__(self) -> int:
    return len(self._records)

  def _read(self, indices) -> list:
    return [flax.serialization.msgpack_restore(r) for r in self._records.__getitems__([int(i) for i in indices])]

  def get(self, indices) -> dict:
    examples = self._read(indices)
    batch = {('image' if k == LATENT else k): np.stack([e[k] for e in examples]) for k in examples[0] if k != CAPTION}
    return dict(batch, label=batch['label'].astype(np.int32))

  def captions(self, indices) -> list[str]:
    examples = self._read(indices)
    if examples and CAPTION not in examples[0]:
      raise ValueError(f'The latent cache {self.directory} holds no captions: it is the cache of a class-conditional '
                       'latent run (latent.autoencoder), not of a text-to-image run (latent.pipeline).')
    return [e[CAPTION] for e in examples]


def _describe(made: dict) -> str:
  return ', '.join(f'latent.{k}={v}' if k in _PATH_KEYS else f'{k} {v}' for k, v in made.items()) or 'nothing known'


def _check_cache_is_of(cache: LatentCacheSource, made: dict, data=None) -> None:
  """Stops when the latent cache was made with other models than `made` (CacheEncoding.made_with) or, given `data`,
  from other data (a key this config lacks is not compared)."""
  same = lambda k, v: (cache.meta.get(k) is not None and epath.Path(cache.meta[k]).resolve() == epath.Path(v).resolve()
                       if k in _PATH_KEYS else cache.meta.get(k) == v)
  if not all(same(k, v) for k, v in made.items()):
    there = {k: cache.meta[k] for k in (*_PATH_KEYS, *made) if k in cache.meta}
    raise ValueError(f'The latent cache {cache.directory} was encoded with {_describe(there)}, not with '
                     f'{_describe(made)}: set another latent.cache, or delete it and encode again.')
  recorded = cache.meta.get('data', {}) if data is not None else {}
  differ = [f'data.{k} is {recorded[k]!r} there, {data.get(k)!r} here' for k in _CACHE_DATA
            if k in recorded and recorded[k] != data.get(k, recorded[k])]
  if differ:
    raise ValueError(f'The latent cache {cache.directory} was encoded from other data ({"; ".join(differ)}): set '
                     'another latent.cache, or delete it and encode again.')


def open_cache(directory, made: dict, latent_shape, data=None) -> LatentCacheSource:
  """The latent cache in `directory`, checked to be made with `made` (and from `data`, if given) and to hold latents
  of the shape latent_shape(its image shape) gives."""
  cache = LatentCacheSource(directory)
  _check_cache_is_of(cache, made, data)
  expected = tuple(latent_shape(tuple(cache.meta['image_shape'])))
  if cache.shape != expected:
    raise ValueError(f'The latent cache {directory} holds latents of shape {cache.shape}; the autoencoder makes '
                     f'{expected}: delete it and encode again.')
  return cache


def complete_cache(config, directory):
  """The complete latent cache in `directory` when it holds one of config's models (`made_with`) and config.data
  (--mode=encode has nothing to do then), None when it holds none (no cache.json).

  Raises:
    ValueError: the cache there is of other models or other data, or its files are unreadable (named).
  """
  if not (epath.Path(directory) / _CACHE_JSON).exists():
    return None
  cache = LatentCacheSource(directory)
  _check_cache_is_of(cache, made_with(config), config.data)
  return cache


def _encode_share(writer, encoding: CacheEncoding, mine: np.ndarray, batch_size: int):
  """Writes the records `mine` through `encoding`; (sum, sum of squares) of their latents and the fields' dtypes."""
  total, total_sq = np.zeros(encoding.shape, np.float64), np.zeros(encoding.shape, np.float64)
  fields = {}
  for chunk in np.array_split(mine, max(1, -(-len(mine) // batch_size))):
    if not len(chunk):
      continue
    encoded = encoding.encode(chunk)
    latent = np.asarray(encoded[LATENT], np.float64)
    total, total_sq = total + latent.sum(0), total_sq + (latent**2).sum(0)
    for i in range(len(chunk)):
      writer.write(_record({k: v[i] for k, v in encoded.items()}))
    fields = {k: str(v.dtype) for k, v in encoded.items() if isinstance(v, np.ndarray)}
    logging.info('Encoded %d / %d records.', chunk[-1] + 1 - mine[0], len(mine))
  return total, total_sq, fields


def write_cache(config, directory) -> LatentCacheSource:
  """Encodes config.data into an ArrayRecord cache in `directory` (`cache_encoding`: the posterior means under
  config.latent.autoencoder, or a text-to-image run's VAE moments and text-encoder states).

  Each process encodes its contiguous share of the records into its own shard; the per-element and per-channel
  mean / std of the latents (over all records) go to stats.npz, and cache.json (the models, the data, the fields'
  dtypes), written last by process 0, marks the cache complete (written atomically). A directory that already holds
  a complete cache is refused (cached: `complete_cache`).
  """
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  directory = epath.Path(directory)
  workdir_lib.writable_directory(directory, 'the latent cache', 'latent.cache')
  if (directory / _CACHE_JSON).exists():
    raise ValueError(f'{directory} already holds a latent cache; delete it or set another latent.cache.')
  encoding = cache_encoding(config)
  source, shape = encoding.source, tuple(encoding.shape)
  directory.mkdir(parents=True, exist_ok=True)
  count, index = jax.process_count(), jax.process_index()
  mine = np.array_split(np.arange(len(source)), count)[index]
  shards = [f'latents-{i:05d}-of-{count:05d}.array_record' for i in range(count)]
  writer = array_record_module.ArrayRecordWriter(str(directory / shards[index]), 'group_size:1')
  total, total_sq, fields = _encode_share(writer, encoding, mine, config.latent.encode_batch_size)
  writer.close()
  sums = np.asarray(multihost_utils.process_allgather(np.stack([total, total_sq]))).reshape((-1, 2) + shape).sum(0)
  n = len(source)
  element_mean, element_sq = sums[0] / n, sums[1] / n
  channel_mean, channel_sq = element_mean.mean((0, 1)), element_sq.mean((0, 1))
  if jax.process_index() == 0:
    with (directory / _CACHE_STATS).open('wb') as f:
      np.savez(f, element_mean=element_mean, element_std=np.sqrt(np.maximum(element_sq - element_mean**2, 1e-12)),
               channel_mean=channel_mean, channel_std=np.sqrt(np.maximum(channel_sq - channel_mean**2, 1e-12)))
    data = {k: config.data[k] for k in _CACHE_DATA if k in config.data}
    workdir_lib.write_atomically(directory / _CACHE_JSON, json.dumps(dict(
        encoding.made_with, data=data, image_shape=list(source.shape), shape=list(shape), count=n,
        num_classes=source.num_classes, fields=fields, shards=shards), indent=2))
  multihost_utils.sync_global_devices('latent cache written')
  return LatentCacheSource(directory)


# ----------------------------------------------------------------------------------------------------------
# The space a run's model works in.
# ----------------------------------------------------------------------------------------------------------
class PixelSpace:
  """The data themselves: no autoencoder."""
  params = None

  def __init__(self, shape):
    self.shape = tuple(shape)

  def prepare(self, params, batch, rng):
    """The batch's images in [-1, 1] (source.to_model_range: stored uint8 pixels scaled on the devices)."""
    del params, rng
    return dict(batch, image=source_lib.to_model_range(batch['image']))

  def decode(self, params, samples):
    """The samples unchanged."""
    del params
    return samples

  def describe(self) -> dict:
    return {'space': 'pixels', 'shape': self.shape}


@dataclasses.dataclass
class LatentSpace:
  """A frozen autoencoder's latent space: `prepare` turns a data batch into normalised latents inside the train step
  (encoding it when `online`, else normalising the cache's means), `decode` turns samples back into images."""
  autoencoder: Autoencoder
  shape: tuple
  normalization: str
  online: bool
  posterior: str
  stats: Any  # (mean, std) of the unscaled latents for 'per_channel' / 'per_element', else None
  params: Any = None  # the autoencoder's parameters on the mesh (frozen['space'] of the train step)

  def normalize(self, raw):
    """z = (raw - shift) * scaling_factor, or (raw - mu) / s * 0.5 with the cache's statistics."""
    if self.stats is None:
      return (raw - self.autoencoder.shift_factor) * self.autoencoder.scaling_factor
    mean, std = self.stats
    return (raw - mean) / std * 0.5

  def denormalize(self, z):
    """The inverse of `normalize`."""
    if self.stats is None:
      return z / self.autoencoder.scaling_factor + self.autoencoder.shift_factor
    mean, std = self.stats
    return z / 0.5 * std + mean

  def prepare(self, params, batch, rng):
    """batch['image'] as normalised latents: the posterior mean or a sample mean + exp(logvar / 2) N(0, I) (drawn
    from `rng`) of the encoder's moments (online) or of the cache's (its means; a text-to-image cache's LOGVAR too)."""
    batch = dict(batch)
    raw, logvar = batch['image'], batch.pop(LOGVAR, None)
    if self.online:
      raw, logvar = self.autoencoder.moments(params, source_lib.to_model_range(raw))
    if self.posterior == 'sample':
      raw = raw + jnp.exp(0.5 * logvar) * jax.random.normal(rng, raw.shape)
    return dict(batch, image=self.normalize(jax.lax.stop_gradient(raw)))

  def decode(self, params, samples):
    """Images in [-1, 1] from normalised latents."""
    return jnp.clip(self.autoencoder.decode_raw(params, self.denormalize(samples)), -1.0, 1.0)

  def describe(self) -> dict:
    return {'space': 'latents', 'autoencoder': str(epath.Path(self.autoencoder.path).resolve()), 'shape': self.shape,
            'normalization': self.normalization}


def check_latent_config(latent) -> None:
  """Fails on an inconsistent config.latent, before anything is read."""
  if latent.normalization not in NORMALIZATIONS:
    raise ValueError(f'latent.normalization={latent.normalization!r}; expected one of {NORMALIZATIONS}.')
  if latent.posterior not in POSTERIORS:
    raise ValueError(f'latent.posterior={latent.posterior!r}; expected one of {POSTERIORS}.')
  if latent.encode_batch_size < 1:
    raise ValueError(f'latent.encode_batch_size={latent.encode_batch_size} must be positive.')
  if not latent.autoencoder and (latent.cache or latent.normalization != 'scaling_factor'):
    raise ValueError('latent.cache / latent.normalization set without latent.autoencoder: name the autoencoder (a '
                     'diffusers AutoencoderKL folder or a cm_jax autoencoder run).')
  if latent.cache and latent.posterior == 'sample':
    raise ValueError("latent.posterior='sample' draws from the encoder in the train step; a latent cache stores the "
                     "posterior means: use 'mean' with latent.cache, or encode on the fly (latent.cache='').")
  if not latent.cache and latent.normalization != 'scaling_factor':
    raise ValueError(f'latent.normalization={latent.normalization!r} uses the data set\'s statistics, which a latent '
                     'cache holds: set latent.cache and write it with --mode=encode.')


def build(config, mesh=None):
  """(space, data source) of a run: pixels and config.data, or a latent space with config.data encoded on the fly or
  its latent cache. The autoencoder's parameters are placed replicated on `mesh`."""
  latent = config.get('latent')
  if latent is not None and latent.get('pipeline'):
    from cm_jax import text_latents  # pylint: disable=g-import-not-at-top
    return text_latents.build(config, mesh)
  if latent is None or not latent.autoencoder:
    if latent is not None:
      check_latent_config(latent)
    source = data_lib.build_source(config.data)
    return PixelSpace(source.shape), source
  check_latent_config(latent)
  autoencoder = load_autoencoder(latent.autoencoder)
  if latent.cache:
    source = open_cache(latent.cache, _autoencoder_made_with(autoencoder), autoencoder.module.latent_shape)
    shape, online = source.shape, False
    stats = None
    if latent.normalization != 'scaling_factor':
      kind = 'element' if latent.normalization == 'per_element' else 'channel'
      stats = (jnp.asarray(source.stats[f'{kind}_mean'], jnp.float32),
               jnp.asarray(source.stats[f'{kind}_std'], jnp.float32))
  else:
    source = data_lib.build_source(config.data)
    shape, online, stats = autoencoder.module.latent_shape(source.shape), True, None
  params = autoencoder.params
  if mesh is not None:
    params = jax.device_put(params, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
  space = LatentSpace(autoencoder, shape, latent.normalization, online, latent.posterior, stats, params)
  return space, source

