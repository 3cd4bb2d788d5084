"""CLIP image towers in Flax, read from transformers folders: the image half of the CLIP score.

* `CLIPVisionModel` mirrors transformers' `CLIPVisionModelWithProjection` parameter tree: vision_model/{embeddings/
  {class_embedding, patch_embedding (a p x p conv of stride p, no bias), position_embedding}, pre_layrnorm (sic),
  encoder/layers_N (models/clip_text.py's encoder layers without the causal mask), post_layernorm} and
  visual_projection (no bias).
* x = [class_embedding; patch_embedding(pixels) row by row] + position_embedding(0..N), then pre_layrnorm, the
  encoder; pooled = post_layernorm(class token of the last layer), image_embeds = visual_projection(pooled).
* `preprocess` is CLIP's image processor: the shortest side resized to image_size (bicubic), the centre crop, the
  OpenAI CLIP mean / std normalisation.
* `load_image_encoder(folder)` reads a CLIPVisionModelWithProjection folder or the image half of a CLIPModel folder
  (config.json with text_config / vision_config, model.safetensors); `load_clip(folder)` gives both towers of a
  CLIPModel folder, its weights read once. No PyTorch is needed.
"""

from etils import epath
import flax.linen as nn
import jax
import jax.numpy as jnp

from cm_jax.formats import diffusers as diffusers_format
from cm_jax.models import clip_text

ARCHITECTURES = ('CLIPModel', 'CLIPVisionModelWithProjection')
MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's per-channel pixel mean and std (of [0, 1] RGB)
STD = (0.26862954, 0.26130258, 0.27577711)


class _Embeddings(nn.Module):
  """[class_embedding; patch_embedding(pixels) per patch] + position_embedding(0..N): [B, S, S, C] -> [B, 1 + N, width]
  with N = (S / patch_size)^2."""
  image_size: int
  patch_size: int
  width: int

  @nn.compact
  def __call__(self, pixels):
    if pixels.shape[1:3] != (self.image_size, self.image_size):
      raise ValueError(f'Images of {pixels.shape[1]}x{pixels.shape[2]} pixels; this CLIP image tower reads '
                       f'{self.image_size}x{self.image_size} (preprocess resizes and crops to it).')
    patches = nn.Conv(self.width, (self.patch_size,) * 2, strides=(self.patch_size,) * 2, padding='VALID',
                      use_bias=False, name='patch_embedding')(pixels)
    patches = patches.reshape(pixels.shape[0], -1, self.width)
    cls = self.param('class_embedding', nn.initializers.normal(1.0), (self.width,))
    x = jnp.concatenate([jnp.broadcast_to(cls, (pixels.shape[0], 1, self.width)), patches], axis=1)
    return x + nn.Embed(x.shape[1], self.width, name='position_embedding')(jnp.arange(x.shape[1]))


class CLIPVisionTransformer(nn.Module):
  """CLIP's vision transformer: pixels [B, S, S, C] (normalised) -> (hidden_states, pooled).

  hidden_states: num_layers + 1 arrays [B, 1 + N, width] (pre_layrnorm(embeddings), then each layer); pooled [B, width]
  = post_layernorm(hidden_states[-1][:, 0]).
  """
  image_size: int = 224
  patch_size: int = 32
  width: int = 768
  intermediate_size: int = 3072
  num_layers: int = 12
  num_heads: int = 12
  hidden_act: str = 'quick_gelu'
  layer_norm_eps: float = 1e-5

  @nn.compact
  def __call__(self, pixels):
    x = _Embeddings(self.image_size, self.patch_size, self.width, name='embeddings')(pixels)
    x = nn.LayerNorm(epsilon=self.layer_norm_eps, name='pre_layrnorm')(x)
    states = clip_text.Encoder(self.num_layers, self.width, self.num_heads, self.intermediate_size, self.hidden_act,
                               self.layer_norm_eps, causal=False, name='encoder')(x)
    return states, nn.LayerNorm(epsilon=self.layer_norm_eps, name='post_layernorm')(states[-1][:, 0])


class CLIPVisionModel(nn.Module):
  """transformers' CLIPVisionModelWithProjection: {'hidden_states', 'pooled', 'image_embeds': pooled W_proj}."""
  vision_model: CLIPVisionTransformer
  projection_dim: int = 512

  @nn.compact
  def __call__(self, pixels):
    states, pooled = self.vision_model(pixels)
    embeds = nn.Dense(self.projection_dim, use_bias=False, name='visual_projection')(pooled)
    return {'hidden_states': states, 'pooled': pooled, 'image_embeds': embeds}


def vision_module(config: dict, projection_dim: int, where: str) -> CLIPVisionModel:
  """The CLIPVisionModel of a CLIPVisionConfig's fields (its defaults for absent ones; also a CLIPModel's
  vision_config)."""
  transformer = CLIPVisionTransformer(
      image_size=int(config.get('image_size', 224)), patch_size=int(config.get('patch_size', 32)),
      width=int(config.get('hidden_size', 768)), intermediate_size=int(config.get('intermediate_size', 3072)),
      num_layers=int(config.get('num_hidden_layers', 12)), num_heads=int(config.get('num_attention_heads', 12)),
      hidden_act=clip_text.activation(config, where), layer_norm_eps=float(config.get('layer_norm_eps', 1e-5)))
  return CLIPVisionModel(transformer, projection_dim)


def preprocess(images, image_size: int):
  """CLIP's pixels of images [B, H, W, C] in [0, 1] (C = 1: grey, repeated to RGB): the shortest side resized to
  image_size (bicubic, antialiased; the long side int(image_size * long / short)), the centre image_size^2 crop
  (offsets floor((side - image_size) / 2)), (x - MEAN) / STD; as transformers' CLIPImageProcessorPil."""
  _, height, width, channels = images.shape
  if channels == 1:
    images = jnp.repeat(images, 3, axis=-1)
  short, long = sorted((height, width))
  resized_long = int(image_size * long / short)
  size = (image_size, resized_long) if height <= width else (resized_long, image_size)
  # Resized as PIL resizes an 8-bit image: the width, then the height, each pass rounded to 8 bits.
  for axis, new in ((2, size[1]), (1, size[0])):
    if images.shape[axis] != new:
      shape = list(images.shape)
      shape[axis] = new
      images = jax.image.resize(images, shape, 'bicubic', antialias=True)
      images = jnp.round(jnp.clip(images, 0.0, 1.0) * 255.0) / 255.0
  top, left = (size[0] - image_size) // 2, (size[1] - image_size) // 2
  images = images[:, top:top + image_size, left:left + image_size]
  return (images - jnp.asarray(MEAN)) / jnp.asarray(STD)


class ImageEncoder:
  """A frozen CLIP image tower with its parameters: encoder(pixels [B, S, S, 3]) -> CLIPVisionModel's output dict.

  `apply(params, pixels)` is the pure function for use inside other jitted steps; __call__ is it jit-compiled with
  this encoder's parameters. `image_size` is the side the tower reads (preprocess(images, image_size)).
  """

  def __init__(self, module: CLIPVisionModel, params, config: dict, path: str):
    self.module, self.params, self.config, self.path = module, params, config, path
    self.image_size = module.vision_model.image_size
    self._apply = jax.jit(self.apply)

  def apply(self, params, pixels) -> dict:
    return self.module.apply({'params': params}, pixels)

  def __call__(self, pixels) -> dict:
    return self._apply(self.params, jnp.asarray(pixels, jnp.float32))


def _read(path) -> tuple[dict, dict, str, str]:
  """(config, state dict, where the weights were read, architecture) of a CLIP folder."""
  folder = epath.Path(path)
  if not folder.is_dir():
    raise FileNotFoundError(f'CLIP folder {folder} does not exist: give the local path of a transformers CLIPModel '
                            'folder (config.json, model.safetensors, the tokenizer files).')
  config_path = folder / diffusers_format.CONFIG_FILE
  config = diffusers_format.read_json(config_path)
  architectures = config.get('architectures') or []
  if len(architectures) != 1 or architectures[0] not in ARCHITECTURES:
    raise ValueError(f'{config_path} describes {architectures!r}; a CLIP folder holds one of {list(ARCHITECTURES)} '
                     '(transformers\' CLIPModel.save_pretrained writes it).')
  if architectures[0] == 'CLIPModel' and not isinstance(config.get('vision_config'), dict):
    raise ValueError(f'{config_path} describes a CLIPModel without a vision_config.')
  state_dict, where = diffusers_format.read_weights(folder, diffusers_format.TRANSFORMERS_STEM)
  return config, state_dict, where, architectures[0]


def _image_encoder(config: dict, state_dict: dict, where: str, architecture: str, path: str) -> ImageEncoder:
  vision_config = config['vision_config'] if architecture == 'CLIPModel' else config
  module = vision_module(vision_config, int(config.get('projection_dim', 512)), where)
  size = module.vision_model.image_size
  abstract = jax.eval_shape(module.init, jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3), jnp.float32))
  tensors = {k: v for k, v in state_dict.items()
             if k.startswith(('vision_model.', 'visual_projection.')) and not k.endswith('position_ids')}
  params = diffusers_format.from_diffusers(tensors, abstract['params'], where)
  return ImageEncoder(module, params, vision_config, path)


def load_image_encoder(path) -> ImageEncoder:
  """The CLIP image tower of a CLIPModel or CLIPVisionModelWithProjection folder, in float32."""
  return _image_encoder(*_read(path), str(path))


def load_clip(path) -> tuple[ImageEncoder, clip_text.TextEncoder]:
  """Both towers (image, text with its text_projection) of a transformers CLIPModel folder, in float32."""
  config, state_dict, where, architecture = _read(path)
  if architecture != 'CLIPModel':
    raise ValueError(f'{path} holds a {architecture}, not a CLIPModel: the CLIP score needs both towers.')
  text_config = config.get('text_config') or {}
  projection = int(config.get('projection_dim', 512))
  text = clip_text.text_encoder(
      clip_text.text_module(text_config, projection, where), {k: v for k, v in state_dict.items()
                                                              if k.startswith(('text_model.', 'text_projection.'))},
      text_config, where, str(path))
  return _image_encoder(config, state_dict, where, architecture, str(path)), text
