"""Pre-flight: a config's train step and sampler compiled for a TPU topology on any host, before paying for a slice.

  python -m cm_jax.preflight --config=configs/NAME.py --topology=v5p:4x4x4 [--config.key=value ...] \
      [--cache_dir=DIR] [--hbm_gib=X]

The experiment is built as a run builds it (experiment.Experiment: the config's mesh over all the topology's chips, its
partition rules), but everything it would read is abstract: the data are a shape (no record is read, no data set need
be present), a distillation teacher's parameters are ShapeDtypeStructs of the student's network without its guidance
input, laid out as a restored teacher run is, and a latent run's autoencoder is built from its config.json alone (no
weights are read). The train step and the sampling of a batch (Experiment.draw, at the sampler's fewest steps: 1 for a
consistency model) are lowered on these and compiled by libtpu for the topology (`jax.experimental.topologies`;
multi-host slices included, e.g. v5p:4x4x4 is 64 chips on 16 hosts). Printed: per-chip bytes from XLA's memory
analysis against the chip's HBM (it fits when both the step and the sampling beside the training inputs do), FLOPs
per chip per step and XLA's estimated step time (cost analysis, 'optimal_seconds'), the implied images/s of the slice
and the utilisation (the FLOPs XLA counts, recomputation included, per second of the estimate, against the chip's peak
bf16 FLOP/s: CHIPS), the collectives in the compiled program (parsed from its HLO text), and the largest buffers when
it does not fit. The last line is machine-readable:

  preflight: fits=<yes|no> hbm_gib=<x.xx> hbm_capacity_gib=<x.x> step_s=<x.xxxx> mfu=<x.xx>

A text-to-image config (latent.pipeline, or model.name='sd_unet') needs no weights either: its VAE, text encoders
and UNet are built from the pipeline folder's config files, or without latent.pipeline from the public SD 1.5 /
2.1-base / SDXL architectures of cm_jax/models/sd_configs.py (--sd_architecture; empty: guessed from data.image_size
and the prediction), and its batch holds caption ids [k, 77] (with latent.cache: the records --mode=encode writes,
VAE moments and text states, so that the step runs no encoder; no cache need exist). E.g. (12 images per chip, as
diffusers' LCM scripts):

  python -m cm_jax.preflight --config=configs/sd15_sample.py --topology=v5p:2x2x1 --config.train.batch_size=48 \
      --config.model.attention_kernel=flash --nosampler

`--topology=cpu:N` compiles for N host CPU devices against a nominal chip (NOMINAL_CPU), so that the machinery runs
where libtpu is absent; its step time is a roofline (FLOPs at the nominal peak, bytes at the nominal bandwidth).

With --cache_dir, JAX's persistent compilation cache is on for every program. A compile-only TPU client writes its
entries but cannot read them back (jax 0.10.2: "PjRtCompiler must be constructed with a Client to call
DeserializeLoadedExecutable"), so for TPU topologies the pre-flight also keeps its own record of each compiled
program's analysis in DIR/preflight, keyed by the lowered program, the topology and the jax and libtpu versions.
"""

import contextlib
import dataclasses
import hashlib
import importlib.metadata
import importlib.util
import json
import math
import os
import re
import sys
import time
from typing import Any, NamedTuple, Optional

from absl import app
from absl import flags
from etils import epath
import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import config_flags

from cm_jax import cli
from cm_jax import latents
from cm_jax import program_analysis
from cm_jax import sharding
from cm_jax.data import source as source_lib
from cm_jax.experiment import Experiment
from cm_jax.data import toy
from cm_jax.formats import diffusers as diffusers_format
from cm_jax.models import clip_text
from cm_jax.models import sd_configs
from cm_jax.models.apply import without_guidance

GIB = 2**30


# Per chip, from each generation's "system architecture" table of the Cloud TPU documentation
# (https://cloud.google.com/tpu/docs/v4, .../v5e, .../v5p, .../v6e; read 2026). The HBM figures are those pages'
# (16, 95, 32 "GB"; v4's 32 "GiB"), taken as GiB: libtpu reports a v5e's HBM as 15.75G available.
CHIPS = {
    'v4': program_analysis.Chip('TPU v4', hbm_gib=32.0, peak_tflops=275.0, hbm_gbps=1200.0),
    'v5e': program_analysis.Chip('TPU v5e', hbm_gib=16.0, peak_tflops=197.0, hbm_gbps=819.0),
    'v5p': program_analysis.Chip('TPU v5p', hbm_gib=95.0, peak_tflops=459.0, hbm_gbps=2765.0),
    'v6e': program_analysis.Chip('TPU v6e', hbm_gib=32.0, peak_tflops=918.0, hbm_gbps=1638.0),
}
# Not a measurement: a stand-in so that --topology=cpu:N runs (and is tested) where libtpu is absent.
NOMINAL_CPU = program_analysis.Chip('host CPU (nominal)', hbm_gib=8.0, peak_tflops=0.1, hbm_gbps=20.0)


# ----------------------------------------------------------------------------------------------------------
# The topology.
# ----------------------------------------------------------------------------------------------------------
class Topology(NamedTuple):
  """A topology's name, chip, devices (one per chip) and the number of hosts they are spread over."""
  name: str
  chip: program_analysis.Chip
  devices: list
  num_hosts: int


def cpu_count(name: str) -> int:
  """N of a 'cpu:N' topology name; 0 for any other name."""
  cpu = re.fullmatch(r'cpu:(\d+)', name)
  return int(cpu.group(1)) if cpu else 0


def topology(name: str) -> Topology:
  """The devices of a TPU topology ('v5p:4x4x4', via libtpu) or of N host CPU devices ('cpu:N')."""
  if name.startswith('cpu:'):
    count, devices = cpu_count(name), jax.devices('cpu')
    if not 1 <= count <= len(devices):
      raise ValueError(f'--topology={name}: expected cpu:N with 1 <= N <= {len(devices)}, the CPU devices of this '
                       'process (the pre-flight sets their number before JAX starts; in Python, set '
                       'jax_num_cpu_devices first).')
    return Topology(name, NOMINAL_CPU, devices[:count], 1)
  tpu = re.fullmatch(r'(v4|v5e|v5p|v6e):(\d+(?:x\d+){1,2})', name)
  if not tpu:
    raise ValueError(f'unknown topology {name!r}: expected <chip>:<shape> with chip one of {", ".join(CHIPS)} '
                     '(e.g. v5p:2x2x1, v5p:4x4x4, v5e:4x4) or cpu:N.')
  if importlib.util.find_spec('libtpu') is None:
    raise ImportError(f'--topology={name} compiles with libtpu, which is not installed: pip install -e \'.[tpu]\'.')
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  # Compiling only: several pre-flights may load libtpu at once (else the second fails on libtpu's lockfile).
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  options = {'chip_config_name': 'megacore'} if tpu.group(1) == 'v4' else {}  # one device per v4 chip, as run
  try:
    devices = topologies.get_topology_desc(topology_name=name, platform='tpu', **options).devices
  except jax.errors.JaxRuntimeError as e:
    raise ValueError(f'--topology={name}: libtpu does not accept it ({str(e).splitlines()[0]}).') from e
  return Topology(name, CHIPS[tpu.group(1)], list(devices), len({d.process_index for d in devices}))


# ----------------------------------------------------------------------------------------------------------
# The experiment, abstract: nothing is read.
# ----------------------------------------------------------------------------------------------------------
class ShapeSource(NamedTuple):
  """A data source known by its record shape and dtype alone (what experiment.Experiment reads of a source); `fields`:
  the other arrays its records hold, (key, shape, dtype) each (a captioned source's 'caption_ids' int32 [k, 77], one
  row per tokenizer; a text-to-image cache's log-variances and text states)."""
  shape: tuple
  dtype: np.dtype
  num_classes: int
  fields: tuple = ()


CAPTIONED_PIXELS = ('captioned_folder', 'webdataset')  # uint8 images of data.image_size, with captions
CAPTION_LENGTH = 77  # CLIP's context: every SD tokenizer pads / truncates to it


def _side(data) -> int:
  if not data.image_size:
    raise ValueError(f'data.image_size=0 keeps {data.name!r}\'s stored size, which the pre-flight does not read: '
                     'set --config.data.image_size.')
  return int(data.image_size)


def data_record(data) -> tuple[tuple, np.dtype]:
  """(shape, dtype) of config.data's records as its source returns them (data/source.py: uint8 pixels, float32 for
  toy points and digits), from the data set's description, without reading a record."""
  if data.name in toy.NAMES:
    return (2,), np.dtype(np.float32)
  if data.name == 'captioned_digits':  # held in memory as floats, like the digits
    source_lib.check_stored_size(data.name, (8, 8, 1), data.image_size)
    return (8, 8, 1), np.dtype(np.float32)
  if data.name in ('image_folder', 'prompts') + CAPTIONED_PIXELS:  # prompts: the resolution a sampling run draws
    return (_side(data), _side(data), 3), np.dtype(np.uint8)
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from cm_jax.data import digits  # pylint: disable=g-import-not-at-top
  name = digits.CmJaxDigits.name if data.name == 'digits' else data.name
  try:
    shape = tuple(tfds.builder(name).info.features['image'].shape)
  except tfds.core.DatasetNotFoundError:
    raise ValueError(f'unknown data set name {data.name!r}: not built in and not known to TFDS.') from None
  source_lib.check_stored_size(data.name, shape, data.image_size)
  return shape, np.dtype(np.float32 if data.name == 'digits' else np.uint8)  # digits are held in memory as floats


def _autoencoder_config(path: str) -> tuple[dict, str]:
  """(config.json, its folder) of a diffusers AutoencoderKL folder or of a cm_jax autoencoder run's export."""
  for folder in (epath.Path(path) / latents.RUN_EXPORT, epath.Path(path)):
    if (folder / latents.CONFIG_FILE).exists():
      return json.loads((folder / latents.CONFIG_FILE).read_text()), str(folder)
  raise FileNotFoundError(f'latent.autoencoder={path!r} has no {latents.CONFIG_FILE}: the pre-flight builds the '
                          'autoencoder from it (its architecture; no weights are read). A latent config without it '
                          'is not supported yet: point latent.autoencoder at the VAE folder or the exported run.')


class _FixedTokens(latents.Pipeline):
  """A pipeline known by its config files: every prompt tokenises to BOS then EOS padding (the pre-flight compiles
  the step; which ids flow through it does not change its cost)."""

  def tokenize(self, prompts) -> np.ndarray:
    ids = np.full((len(prompts), len(self.text_encoders), CAPTION_LENGTH), 49407, np.int32)
    ids[..., 0] = 49406
    return ids


def pipeline_configs(config, sd_architecture: str = '') -> tuple[dict, str, bool]:
  """({'unet', 'vae' (None: a pixel pipeline), 'text_encoders', 'scheduler'} config dicts, where from, whether from a
  folder) of a text-to-image run: latent.pipeline's config files (model_index.json and each component's config; no
  weights are read), else the public architecture sd_configs.ARCHITECTURES[sd_architecture] (empty: guessed from
  data.image_size and the prediction, sd_configs.guess)."""
  from cm_jax import digits_pipeline  # pylint: disable=g-import-not-at-top
  from cm_jax import text_latents  # pylint: disable=g-import-not-at-top
  path = config.latent.get('pipeline', '') if config.get('latent') is not None else ''
  if not path:
    name = sd_architecture or sd_configs.guess(int(config.data.get('image_size', 0) or 0),
                                               config.parameterization.get('prediction', 'epsilon'))
    return dict(sd_configs.architecture(name)), f'the public {name} architecture (cm_jax/models/sd_configs.py)', False
  folder = epath.Path(digits_pipeline.ensure() if path == text_latents.DIGITS else path)
  index_path = folder / latents.PIPELINE_INDEX
  if not index_path.exists():
    raise FileNotFoundError(f'latent.pipeline={path!r} has no {latents.PIPELINE_INDEX}: the pre-flight reads the '
                            'pipeline\'s config files (no weights); leave latent.pipeline empty to use a public '
                            f'architecture (--sd_architecture, one of {sorted(sd_configs.ARCHITECTURES)}).')
  index = diffusers_format.read_json(index_path)
  present = {n for n, spec in index.items() if not n.startswith('_') and isinstance(spec, list) and spec[0]}
  read = lambda *parts: diffusers_format.read_json(folder.joinpath(*parts))
  encoders = sorted(n for n in present if n.startswith('text_encoder'))
  return (dict(unet=read('unet', latents.CONFIG_FILE),
               vae=read('vae', latents.CONFIG_FILE) if 'vae' in present else None,
               text_encoders=tuple(read(n, latents.CONFIG_FILE) for n in encoders),
               scheduler=diffusers_format.read_json(folder / diffusers_format.SCHEDULER_CONFIG)), str(folder), True)


def _abstract_pipeline(config, mesh, sd_architecture: str) -> latents.Pipeline:
  """The pipeline of a text-to-image run from its config files (pipeline_configs): the VAE and the text encoders
  with abstract (replicated) parameters, the UNet config the network's (models.build_model), no tokenizer."""
  from cm_jax import text_latents  # pylint: disable=g-import-not-at-top
  configs, where, from_folder = pipeline_configs(config, sd_architecture)
  replicated = sharding.replicated(mesh)
  place = lambda tree: jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated), tree)
  encoders = []
  for i, c in enumerate(configs['text_encoders']):
    module = clip_text.module_from_config(c, f'{where}: text encoder {i}')
    params = jax.eval_shape(module.init, jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))['params']
    encoders.append(clip_text.TextEncoder(module, place(params), c, where))
  autoencoder = None
  if configs['vae'] is not None:
    vae = configs['vae']
    module = latents.module_from_config(vae, f'{where}: vae')
    side = 2 * module.downsampling
    params = jax.eval_shape(module.init, jax.random.PRNGKey(0), jnp.zeros((1, side, side, module.in_channels)))
    autoencoder = latents.Autoencoder(module, place(params['params']), vae.get('scaling_factor', 0.18215),
                                      vae.get('shift_factor'), where)
  pipe = _FixedTokens(path=where, autoencoder=autoencoder, unet_module=None, unet_params=None,
                      unet_config=dict(configs['unet']), text_encoders=tuple(encoders),
                      tokenizers=(None,) * len(encoders),
                      process=latents.process_from_scheduler(configs['scheduler'], f'{where}: scheduler'),
                      timestep_spacing=configs['scheduler'].get('timestep_spacing', 'leading'))
  if from_folder:
    text_latents.check_process(config, pipe)
  return pipe


def _cached_text(pipe: latents.Pipeline, text_params, replicated) -> tuple[tuple, tuple]:
  """(params[NULL_TEXT]: the empty prompt's states, replicated; the ShapeSource fields of a cached record's text
  states) of a text-to-image cache (text_latents.cache_encoding: TEXT_DTYPE, SDXL's pooled too), abstractly."""
  from cm_jax import text_latents  # pylint: disable=g-import-not-at-top
  null = jax.eval_shape(pipe.text_features, text_params, jnp.asarray(pipe.tokenize([''])))
  place = lambda a: None if a is None else jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated)
  states = zip((text_latents.HIDDEN, text_latents.POOLED), null)
  fields = tuple((key, a.shape[1:], np.dtype(text_latents.TEXT_DTYPE)) for key, a in states if a is not None)
  return tuple(place(a) for a in null), fields


def abstract_text_space(config, mesh, sd_architecture: str = ''):
  """(text_latents.TextLatentSpace, ShapeSource) of a text-to-image run (latent.pipeline or model.name='sd_unet')
  with nothing read but config files (_abstract_pipeline): on the fly, records of pixels and caption ids [k, 77]
  encoded in the step; with latent.cache, records as --mode=encode writes them (text_latents.cache_encoding: the
  VAE's moments float32, or a pixel pipeline's image as stored, and the text states), the empty prompt's states in
  params[NULL_TEXT], so that the step runs neither the VAE encoder nor the text encoders."""
  from cm_jax import text_latents  # pylint: disable=g-import-not-at-top
  latent = config.latent
  if latent.get('autoencoder') or latent.get('normalization', 'scaling_factor') != 'scaling_factor':
    raise ValueError('a text-to-image run brings its pipeline\'s VAE (encoded on the fly, or read from latent.cache): '
                     'leave latent.autoencoder empty and latent.normalization=scaling_factor.')
  pipe, cache = _abstract_pipeline(config, mesh, sd_architecture), latent.get('cache', '')
  autoencoder, (shape, dtype) = pipe.autoencoder, data_record(config.data)
  if autoencoder is None:  # a pixel pipeline: the UNet's channels
    shape = shape[:2] + (int(pipe.unet_config.get('in_channels', 4)),)
  params = {'autoencoder': autoencoder and autoencoder.params,
            'text_encoders': tuple(e.params for e in pipe.text_encoders)}
  fields = ((text_latents.CAPTION_IDS, (len(pipe.text_encoders), CAPTION_LENGTH), np.dtype(np.int32)),)
  if cache:
    params[text_latents.NULL_TEXT], fields = _cached_text(pipe, params['text_encoders'], sharding.replicated(mesh))
  if autoencoder is None:
    space = latents.PixelSpace(shape)
  else:
    space = latents.LatentSpace(autoencoder, autoencoder.module.latent_shape(shape), 'scaling_factor', not cache,
                                latent.get('posterior', 'mean'), None, params['autoencoder'])
  text = text_latents.TextLatentSpace(space, pipe, int(shape[0]), float(latent.get('caption_dropout', 0.0)), params)
  num_classes = int(config.model.get('num_classes', 0))
  if not cache:
    return text, ShapeSource(shape, dtype, num_classes, fields)
  if autoencoder is not None:  # the posterior's mean as the image, its log-variance beside it
    dtype, fields = np.dtype(np.float32), ((latents.LOGVAR, space.shape, np.dtype(np.float32)),) + fields
  return text, ShapeSource(space.shape, dtype, num_classes, fields)


def text_to_image(config) -> bool:
  """Whether `config` is a text-to-image run: latent.pipeline names a pipeline, or the network is an SD UNet."""
  latent = config.get('latent')
  return bool(latent is not None and latent.get('pipeline')) or config.model.get('name') == 'sd_unet'


def abstract_space(config, mesh, sd_architecture: str = ''):
  """(space, source) as latents.build gives them, with nothing read: pixels of config.data's shape, the latent
  space of an autoencoder built from its config.json with abstract (replicated) parameters and placeholder cache
  statistics (zero mean, unit scale), or a text-to-image run's space (abstract_text_space; `sd_architecture` picks
  the public architecture when the config names no latent.pipeline)."""
  if text_to_image(config):
    return abstract_text_space(config, mesh, sd_architecture)
  (shape, dtype), latent = data_record(config.data), config.get('latent')
  num_classes = int(config.model.get('num_classes', 0))
  if latent is None or not latent.autoencoder:
    return latents.PixelSpace(shape), ShapeSource(shape, dtype, num_classes)
  latents.check_latent_config(latent)
  ae_config, folder = _autoencoder_config(latent.autoencoder)
  module = latents.module_from_config(ae_config, folder)
  side = 2 * module.downsampling  # parameter shapes do not depend on the image size
  params = jax.eval_shape(module.init, jax.random.PRNGKey(0), jnp.zeros((1, side, side, module.in_channels)))
  replicated = sharding.replicated(mesh)
  params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated), params['params'])
  autoencoder = latents.Autoencoder(module, params, ae_config.get('scaling_factor', 0.18215),
                                    ae_config.get('shift_factor'), folder)
  latent_shape = module.latent_shape(shape)
  stats = None
  if latent.normalization != 'scaling_factor':
    stats_shape = latent_shape if latent.normalization == 'per_element' else latent_shape[-1:]
    stats = (jnp.zeros(stats_shape), jnp.ones(stats_shape))
  space = latents.LatentSpace(autoencoder, latent_shape, latent.normalization, not latent.cache, latent.posterior,
                              stats, params)
  if latent.cache:
    return space, ShapeSource(latent_shape, np.dtype(np.float32), num_classes)
  return space, ShapeSource(shape, dtype, num_classes)


def abstract_experiment(config, devices, sd_architecture: str = '') -> Experiment:
  """Experiment of `config` on `devices` with its space and source from `abstract_space`."""
  build = lambda c, mesh: abstract_space(c, mesh, sd_architecture)
  return Experiment(config, devices, build_space=build)


def _as_first_ema(params, exp: Experiment):
  """ShapeDtypeStructs of `params` laid out as the state's first EMA is (the rules see 'ema/0/...')."""
  c = exp.config
  shardings = sharding.tree_shardings({'ema': (params,)}, exp.mesh, tuple(c.mesh.rules), c.mesh.min_size)['ema'][0]
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), params, shardings)


def abstract_teacher(exp: Experiment):
  """A distillation teacher's parameters (None when the objective distils none): the student's network without its
  guidance input (what experiment.load_teacher accepts), laid out as a teacher run's restored first EMA."""
  if exp.objective.distils is None:
    return None
  model = without_guidance(exp.model)
  init = lambda rng: model.init({'params': rng}, *exp.sample_input)['params']
  return _as_first_ema(jax.eval_shape(init, jax.random.PRNGKey(0)), exp)


def abstract_batch(exp: Experiment) -> dict:
  """One global batch as the pipeline gives it: {'image', 'label'} and the source's other fields (a captioned source's
  'caption_ids', a text-to-image cache's states), split over the mesh."""
  size, where = exp.config.train.batch_size, exp.batch_sharding
  batch = {'image': jax.ShapeDtypeStruct((size,) + tuple(exp.source.shape), exp.source.dtype, sharding=where),
           'label': jax.ShapeDtypeStruct((size,), jnp.int32, sharding=where)}
  for key, shape, dtype in getattr(exp.source, 'fields', ()):
    batch[key] = jax.ShapeDtypeStruct((size,) + tuple(shape), dtype, sharding=where)
  return batch


def shard_bytes(tree) -> int:
  """Bytes one device holds of a pytree of sharded ShapeDtypeStructs."""
  return sum(int(np.prod(x.sharding.shard_shape(x.shape))) * x.dtype.itemsize for x in jax.tree.leaves(tree))


# ----------------------------------------------------------------------------------------------------------
# Compiling.
# ----------------------------------------------------------------------------------------------------------
class OutOfMemory(Exception):
  """The compiler refused the program: it needs more HBM than the chip has (its message says how much)."""


@contextlib.contextmanager
def _cache_events():
  """Yields the list of JAX persistent-cache events ('cache_hits', 'cache_misses') recorded inside the block."""
  events = []
  listener = lambda name, **kwargs: events.append(name.rsplit('/', 1)[-1])
  jax.monitoring.register_event_listener(listener)
  try:
    yield events
  finally:
    jax.monitoring.unregister_event_listener(listener)


def _record_path(cache_dir, lowered, topo: Topology) -> epath.Path:
  """Where the pre-flight keeps one program's analysis: keyed by its lowered text, the topology and the versions."""
  versions = f'jax {jax.__version__} libtpu {importlib.metadata.version("libtpu")}'
  key = hashlib.sha256('\n'.join((lowered.as_text(), topo.name, versions)).encode()).hexdigest()
  return epath.Path(cache_dir) / 'preflight' / f'{key}.json'


def compile_and_analyse(lowered, topo: Topology, cache_dir: Optional[str]) -> program_analysis.Analysis:
  """Compiles a lowered program (or reads its record, TPU topologies with a cache_dir) and analyses it.

  Raises OutOfMemory when the TPU compiler finds that it does not fit.
  """
  record = _record_path(cache_dir, lowered, topo) if cache_dir and topo.chip is not NOMINAL_CPU else None
  if record is not None and record.exists():
    return dataclasses.replace(program_analysis.Analysis(**json.loads(record.read_text())), cache='record')
  start = time.perf_counter()
  with _cache_events() as events:
    try:
      compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:
      if 'RESOURCE_EXHAUSTED' in str(e):
        raise OutOfMemory(str(e).splitlines()[0]) from e
      raise
  analysis = program_analysis.analyse(compiled, time.perf_counter() - start)
  if cache_dir:
    analysis.cache = 'hit' if 'cache_hits' in events else 'miss'
  if record is not None:
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(dataclasses.asdict(analysis)))
  return analysis


# ----------------------------------------------------------------------------------------------------------
# The pre-flight.
# ----------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Report:
  """The pre-flight of one config on one topology: the train step's and the sampler's analyses (None when the
  compiler refused the step: `refused` holds its message), the resident state bytes and the largest inputs."""
  config_name: str
  topo: Topology
  exp: Any
  capacity_gib: float
  state_bytes: int
  largest_inputs: list
  step: Optional[program_analysis.Analysis] = None
  sampler: Optional[program_analysis.Analysis] = None
  sample_steps: int = 0
  refused: str = ''

  @property
  def sampling_bytes(self) -> int:
    """Per-chip bytes while sampling during training: the train step's inputs stay resident besides the sampler's
    outputs and temporaries (0 without a sampler analysis)."""
    if self.sampler is None:
      return 0
    return self.step.argument_bytes + self.sampler.output_bytes + self.sampler.temp_bytes

  @property
  def hbm_bytes(self) -> int:
    """The most a chip holds: the train step or the sampling beside it; the largest size in the compiler's message
    when it refused the train step."""
    if self.step is None:
      sizes = [float(n) * {'K': 2**-20, 'M': 2**-10, 'G': 1.0, 'T': 2**10}[u]
               for n, u in re.findall(r'([\d.]+)\s*([KMGT])i?B?\b', self.refused)]
      return int(max(sizes, default=0.0) * GIB)
    return max(self.step.hbm_bytes, self.sampling_bytes)

  @property
  def fits(self) -> bool:
    return not self.refused and self.hbm_bytes <= self.capacity_gib * GIB

  def step_seconds(self) -> float:
    return math.nan if self.step is None else self.step.step_seconds(self.topo.chip)

  def mfu(self) -> float:
    """FLOPs per chip per step / (step time x the chip's peak)."""
    return math.nan if self.step is None else self.step.flops / (self.step_seconds() * self.topo.chip.peak_tflops
                                                                 * 1e12)

  def machine_line(self) -> str:
    return (f'preflight: fits={"yes" if self.fits else "no"} hbm_gib={self.hbm_bytes / GIB:.2f} '
            f'hbm_capacity_gib={self.capacity_gib:.1f} step_s={self.step_seconds():.4f} mfu={self.mfu():.2f}')


def _largest_inputs(inputs, count: int = 8) -> list:
  """The `count` largest per-chip input leaves: [bytes, 'path shape -> shard shape']."""
  leaves = jax.tree_util.tree_flatten_with_path(inputs)[0]
  rows = [[shard_bytes(x), f'{sharding.tree_path(path)} {x.dtype}{list(x.shape)} -> '
           f'{list(x.sharding.shard_shape(x.shape))}'] for path, x in leaves]
  return sorted(rows, key=lambda r: -r[0])[:count]


def run(config, topology_name: str, cache_dir: Optional[str] = None, hbm_gib: Optional[float] = None,
        config_name: str = 'config', sampler: bool = True, sd_architecture: str = '') -> Report:
  """The pre-flight of `config` on a topology: builds the abstract experiment, compiles and analyses its train step
  and (when the step fits and `sampler`) its sampler at its fewest steps. `sd_architecture`: the public Stable
  Diffusion architecture of a text-to-image config without latent.pipeline (sd_configs.ARCHITECTURES)."""
  topo = topology(topology_name)
  exp = abstract_experiment(config, topo.devices, sd_architecture)  # the batch divides over the chips, so their hosts
  state, batch = exp.abstract_state, abstract_batch(exp)
  frozen = exp.frozen(abstract_teacher(exp), abstract=True)
  report = Report(config_name, topo, exp, topo.chip.hbm_gib if hbm_gib is None else hbm_gib, shard_bytes(state),
                  _largest_inputs({'state': state, 'batch': batch, 'frozen': frozen}))
  try:
    report.step = compile_and_analyse(exp.train_step().lower(state, batch, frozen), topo, cache_dir)
  except OutOfMemory as e:
    report.refused = str(e)
    return report
  if not sampler:
    return report
  report.sample_steps = min(exp.sampler.eval_steps(config))
  replicated = sharding.replicated(exp.mesh)
  params = jax.eval_shape(exp.objective.sample_params, state.ema[0], frozen)  # LoRA: the teacher merged, laid out anew
  same = jax.tree.structure(params) == jax.tree.structure(state.ema[0])
  params = state.ema[0] if same else _as_first_ema(params, exp)
  key = jax.eval_shape(jax.random.PRNGKey, 0)
  rng = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=replicated)
  text = None
  if exp.text_conditioned:  # the prompts' ids [B, k, 77] and the negative prompt's [k, 77]
    k = len(exp.space.pipe.text_encoders)
    text = (jax.ShapeDtypeStruct((config.train.batch_size, k, CAPTION_LENGTH), jnp.int32, sharding=exp.batch_sharding),
            jax.ShapeDtypeStruct((k, CAPTION_LENGTH), jnp.int32, sharding=replicated))
  lowered = exp.draw_fn().lower(params, exp.space.params, rng, batch=config.train.batch_size,
                                num_steps=report.sample_steps, text=text)
  try:
    report.sampler = compile_and_analyse(lowered, topo, cache_dir)
  except OutOfMemory as e:
    report.refused = f'the sampler at {report.sample_steps} step(s): {e}'
  return report


def _gib(n) -> str:
  """Bytes in GiB, or in MiB below 1 GiB."""
  return f'{n / GIB:.2f} GiB' if n >= GIB else f'{n / 2**20:.1f} MiB'


def _compiled(a: program_analysis.Analysis) -> str:
  """How the program was obtained: compiled (with JAX's cache hit or miss) or read from the pre-flight's record."""
  if a.cache == 'record':
    return f'read from the pre-flight record (its compile took {a.compile_s:.1f} s)'
  return f'compiled in {a.compile_s:.1f} s' + ('' if a.cache == 'off' else f' (JAX cache: {a.cache})')


def _collective_line(found: dict) -> str:
  """'all-gather 3 (1.2 MiB), reduce-scatter 0, ...'."""
  return ', '.join(f'{kind} {n}' + (f' ({b / 2**20:.1f} MiB)' if n else '') for kind, (n, b) in found.items())


def describe(report: Report) -> list[str]:
  """The report's human-readable lines (the machine line last)."""
  topo, exp, c = report.topo, report.exp, report.exp.config
  chip, batch, chips = topo.chip, c.train.batch_size, len(topo.devices)
  mesh = ' '.join(f'{k}={v}' for k, v in exp.mesh.shape.items())
  lines = [f'cm_jax preflight: {report.config_name} ({c.objective.name}, {c.model.name}) on {topo.name}: {chips} '
           f'chips of {chip.name} ({chip.hbm_gib:g} GiB HBM, {chip.peak_tflops:g} TFLOP/s bf16 peak each), '
           f'{topo.num_hosts} host(s); mesh {mesh}; global batch {batch} ({batch // chips} per chip); state '
           f'{_gib(report.state_bytes)} per chip']
  if exp.text_conditioned:
    lines.append(f'text-to-image: the networks of {exp.space.pipe.path}; model.dtype={c.model.get("dtype")} '
                 f'remat={c.model.get("remat")} attention_kernel={c.model.get("attention_kernel")}; the '
                 + ('VAE moments and text states are read from latent.cache (no encoder in the step)'
                    if exp.space.cached else f'{len(exp.space.pipe.text_encoders)} text encoder(s) and the VAE '
                    'encoder run inside the step'))
  step = report.step
  if step is None:
    lines.append(f'train step: the compiler refused it: {report.refused}')
  else:
    seconds = report.step_seconds()
    source = ('XLA\'s estimate' if step.estimated else 'roofline max(FLOPs / peak, bytes / HBM bandwidth)'
              + ('' if step.optimal_seconds is None else f': XLA\'s estimate {step.optimal_seconds:.4g} s is unusable'))
    lines += [
        f'train step: {_compiled(step)}',
        f'  per chip: arguments {_gib(step.argument_bytes)}, outputs {_gib(step.output_bytes)}, temporaries '
        f'{_gib(step.temp_bytes)}, aliased {_gib(step.alias_bytes)}, program {_gib(step.code_bytes)} -> '
        f'{_gib(step.hbm_bytes)} of {report.capacity_gib:g} GiB ({step.hbm_bytes / (report.capacity_gib * GIB):.1%})',
        f'  {step.flops / 1e12:.4g} TFLOP per chip per step; step time {seconds * 1e3:.4g} ms ({source}) -> '
        f'{batch / seconds:.1f} images/s on the slice; MFU {report.mfu():.1%} of the bf16 peak',
        f'  {step.bytes_accessed / 1e9:.4g} GB accessed per chip per step: {step.flops / step.bytes_accessed:.0f} '
        f'FLOP per byte (the chip\'s ridge: {chip.peak_tflops * 1e3 / chip.hbm_gbps:.0f})',
        f'  collectives (per chip, each instruction once): {_collective_line(step.collectives)}']
  if step is not None and report.refused:
    lines.append(f'the compiler refused {report.refused}')
  if report.sampler is not None:
    s = report.sampler
    lines += [f'sampler with decoding ({report.sample_steps} step(s), batch {batch}): {_compiled(s)}; '
              f'{s.flops / 1e12:.4g} TFLOP '
              f'per chip, {s.step_seconds(chip) * 1e3:.4g} ms; per chip '
              f'{_gib(s.hbm_bytes)} alone, {_gib(report.sampling_bytes)} beside the training inputs']
  if not report.fits:
    lines.append('largest inputs per chip: ' + '; '.join(f'{_gib(b)} {what}' for b, what in report.largest_inputs))
    if step is not None:
      lines.append('largest values of the train step per chip: ' + '; '.join(f'{_gib(b)} {what}'
                                                                             for b, what in step.largest))
  return lines + [report.machine_line()]


# ----------------------------------------------------------------------------------------------------------
# Command line.
# ----------------------------------------------------------------------------------------------------------
def start_jax(cpu_devices: int, cache_dir: Optional[str]) -> None:
  """JAX settings that must precede its first use: host CPU only (nothing runs on a device; a TPU VM's chips are not
  taken), `cpu_devices` CPU devices when > 0, and the persistent cache (no size or time floor) for a cache_dir."""
  jax.config.update('jax_platforms', 'cpu')
  if cpu_devices:
    jax.config.update('jax_num_cpu_devices', cpu_devices)
  if cache_dir:
    jax.config.update('jax_compilation_cache_dir', cache_dir)
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
    jax.config.update('jax_persistent_cache_min_entry_size_bytes', -1)


def define_flags() -> None:
  """The command line's flags: defined when run as a program only, so that importing the module defines none."""
  config_flags.DEFINE_config_file('config', None, 'Experiment config file.', lock_config=True)
  flags.DEFINE_string('topology', None, 'TPU topology <chip>:<shape> (chip: v4, v5e, v5p, v6e; e.g. v5p:2x2x1, '
                      'v5p:4x4x4) or cpu:N (N host CPU devices, a nominal chip).')
  flags.DEFINE_string('cache_dir', None, 'Persistent compilation cache directory (and pre-flight records).')
  flags.DEFINE_float('hbm_gib', None, 'Per-chip capacity to check against instead of the chip\'s HBM.')
  flags.DEFINE_bool('sampler', True, 'Also compile the sampler (its bytes beside the training inputs count).')
  flags.DEFINE_enum('sd_architecture', '', [''] + sorted(sd_configs.ARCHITECTURES),
                    'A text-to-image config without latent.pipeline: the public Stable Diffusion architecture to '
                    'compile (cm_jax/models/sd_configs.py); empty: sdxl at data.image_size >= 1024, sd21_base for '
                    'v-prediction, else sd15.')
  flags.mark_flags_as_required(['config', 'topology'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  start_jax(cpu_count(f.topology), f.cache_dir)
  name = config_flags.get_config_filename(f['config'])
  try:
    report = run(f.config, f.topology, f.cache_dir, f.hbm_gib, name, f.sampler, f.sd_architecture)
  except (ValueError, FileNotFoundError, ImportError) as e:
    print(f'cm_jax: error: {e}', file=sys.stderr, flush=True)
    sys.exit(1)
  print('\n'.join(describe(report)), flush=True)
  if not report.fits:
    print(f'cm_jax: error: {name} does not fit on {report.topo.name}: {report.hbm_bytes / GIB:.2f} GiB per chip '
          f'against {report.capacity_gib:g} GiB; shard the state (mesh.shape.fsdp), lower train.batch_size or use '
          'a larger topology.', file=sys.stderr, flush=True)
    sys.exit(1)


if __name__ == '__main__':
  define_flags()
  app.run(main, flags_parser=cli.parse_flags)
