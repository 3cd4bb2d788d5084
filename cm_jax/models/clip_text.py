"""CLIP text encoders in Flax, read from transformers folders: the prompt encoders of Stable Diffusion and LCM.

* `CLIPTextModel` mirrors transformers' `CLIPTextModel` / `CLIPTextModelWithProjection` parameter tree:
  text_model/{embeddings/{token,position}_embedding, encoder/layers_N/{self_attn/{q,k,v,out}_proj, layer_norm1,
  mlp/{fc1,fc2}, layer_norm2}, final_layer_norm} and, with a projection, text_projection (no bias). Pre-norm causal
  self-attention blocks; hidden_act 'quick_gelu' x * sigmoid(1.702 x) or 'gelu' (erf) from the config.
* Outputs: every hidden state (the embeddings, then each layer's output: SD1 reads the last through
  final_layer_norm, SD2 the penultimate `hidden_states[-2]`), last_hidden_state = final_layer_norm(hidden_states[-1]),
  pooled = last_hidden_state at the end-of-text position (the largest id when eos_token_id == 2, the legacy CLIP
  configs; else the first position holding eos_token_id) and text_embeds = text_projection(pooled).
* `load_text_encoder(folder)` reads config.json + model.safetensors (or model.fp16.safetensors, or a sharded
  model.safetensors.index.json) through formats/diffusers.py's converter; no PyTorch is needed. The 'text_model.'
  prefix that transformers 5 drops when it saves a bare CLIPTextModel is restored here. `load_tokenizer` / `tokenize` give the [B, 77] int32 ids the encoder reads.
"""

import json
from typing import Any

from absl import logging
from etils import epath
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cm_jax.formats import diffusers as diffusers_format

ARCHITECTURES = ('CLIPTextModel', 'CLIPTextModelWithProjection')
TOKENIZER_FILES = ('vocab.json', 'merges.txt')
_LEGACY_EOS = 2  # the eos_token_id of CLIP configs written before transformers PR #24773


def _quick_gelu(x):
  """x * sigmoid(1.702 x), CLIP's original activation."""
  return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS = {'quick_gelu': _quick_gelu, 'gelu': lambda x: jax.nn.gelu(x, approximate=False)}


class _Embeddings(nn.Module):
  """token_embedding(ids) + position_embedding(0..L-1): [B, L] -> [B, L, width]."""
  vocab_size: int
  max_positions: int
  width: int

  @nn.compact
  def __call__(self, input_ids):
    if input_ids.shape[-1] > self.max_positions:
      raise ValueError(f'{input_ids.shape[-1]} tokens per prompt, more than the {self.max_positions} positions of this '
                       'text encoder: tokenize with max_length <= max_position_embeddings.')
    tokens = nn.Embed(self.vocab_size, self.width, name='token_embedding')(input_ids)
    positions = nn.Embed(self.max_positions, self.width, name='position_embedding')(jnp.arange(input_ids.shape[-1]))
    return tokens + positions


class _Attention(nn.Module):
  """Multi-head self-attention out_proj(softmax(q k^T / sqrt(d) + mask) v), q, k, v = x W + b; the mask is causal
  (the text tower) or none (the image tower)."""
  width: int
  num_heads: int
  causal: bool = True

  @nn.compact
  def __call__(self, x):
    head_dim = self.width // self.num_heads
    split = lambda t: t.reshape(*t.shape[:-1], self.num_heads, head_dim)
    q, k, v = (split(nn.Dense(self.width, name=f'{n}_proj')(x)) for n in ('q', 'k', 'v'))
    logits = jnp.einsum('bqhd,bkhd->bhqk', q, k) * head_dim ** -0.5
    if self.causal:
      length = x.shape[-2]
      logits = jnp.where(jnp.tril(jnp.ones((length, length), bool)), logits, jnp.finfo(logits.dtype).min)
    weights = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum('bhqk,bkhd->bqhd', weights, v).reshape(x.shape)
    return nn.Dense(self.width, name='out_proj')(out)


class _MLP(nn.Module):
  """fc2(act(fc1(x)))."""
  width: int
  intermediate_size: int
  hidden_act: str

  @nn.compact
  def __call__(self, x):
    hidden = nn.Dense(self.intermediate_size, name='fc1')(x)
    return nn.Dense(self.width, name='fc2')(ACTIVATIONS[self.hidden_act](hidden))


class _EncoderLayer(nn.Module):
  """Pre-norm block: x + attn(layer_norm1(x)), then x + mlp(layer_norm2(x))."""
  width: int
  num_heads: int
  intermediate_size: int
  hidden_act: str
  layer_norm_eps: float
  causal: bool

  @nn.compact
  def __call__(self, x):
    x = x + _Attention(self.width, self.num_heads, self.causal, name='self_attn')(
        nn.LayerNorm(epsilon=self.layer_norm_eps, name='layer_norm1')(x))
    return x + _MLP(self.width, self.intermediate_size, self.hidden_act, name='mlp')(
        nn.LayerNorm(epsilon=self.layer_norm_eps, name='layer_norm2')(x))


class Encoder(nn.Module):
  """The stack of encoder layers (causal: the text tower's; not: the image tower's, models/clip_vision.py); returns
  the input and each layer's output."""
  num_layers: int
  width: int
  num_heads: int
  intermediate_size: int
  hidden_act: str
  layer_norm_eps: float
  causal: bool = True

  @nn.compact
  def __call__(self, x):
    states = [x]
    for i in range(self.num_layers):
      states.append(_EncoderLayer(self.width, self.num_heads, self.intermediate_size, self.hidden_act,
                                  self.layer_norm_eps, self.causal, name=f'layers_{i}')(states[-1]))
    return states


class CLIPTextTransformer(nn.Module):
  """CLIP's text transformer: input_ids [B, L] -> (hidden_states, last_hidden_state, pooled).

  hidden_states: L+1 arrays [B, L, width] (embeddings, then each layer); last_hidden_state =
  final_layer_norm(hidden_states[-1]); pooled [B, width] = last_hidden_state[b, eos position of row b].
  """
  vocab_size: int = 49408
  width: int = 512
  intermediate_size: int = 2048
  num_layers: int = 12
  num_heads: int = 8
  max_positions: int = 77
  hidden_act: str = 'quick_gelu'
  layer_norm_eps: float = 1e-5
  eos_token_id: int = 49407

  @nn.compact
  def __call__(self, input_ids):
    x = _Embeddings(self.vocab_size, self.max_positions, self.width, name='embeddings')(input_ids)
    states = Encoder(self.num_layers, self.width, self.num_heads, self.intermediate_size, self.hidden_act,
                     self.layer_norm_eps, name='encoder')(x)
    last = nn.LayerNorm(epsilon=self.layer_norm_eps, name='final_layer_norm')(states[-1])
    if self.eos_token_id == _LEGACY_EOS:
      eos = jnp.argmax(input_ids, axis=-1)
    else:
      eos = jnp.argmax(input_ids == self.eos_token_id, axis=-1)
    pooled = jnp.take_along_axis(last, eos[:, None, None], axis=1)[:, 0]
    return states, last, pooled


class CLIPTextModel(nn.Module):
  """transformers' CLIPTextModel (projection_dim None) or CLIPTextModelWithProjection.

  Returns {'hidden_states': [...], 'last_hidden_state', 'pooled', 'text_embeds': pooled W_proj or None}.
  """
  text_model: CLIPTextTransformer
  projection_dim: int | None = None

  @nn.compact
  def __call__(self, input_ids):
    states, last, pooled = self.text_model(input_ids)
    embeds = None
    if self.projection_dim is not None:
      embeds = nn.Dense(self.projection_dim, use_bias=False, name='text_projection')(pooled)
    return {'hidden_states': states, 'last_hidden_state': last, 'pooled': pooled, 'text_embeds': embeds}


def activation(config: dict, where: str) -> str:
  """A CLIP config's hidden_act (default 'quick_gelu'), one of ACTIVATIONS."""
  hidden_act = config.get('hidden_act', 'quick_gelu')
  if hidden_act not in ACTIVATIONS:
    raise ValueError(f'{where}: hidden_act {hidden_act!r}; cm_jax reads {sorted(ACTIVATIONS)}.')
  return hidden_act


def module_from_config(config: dict, where: str) -> CLIPTextModel:
  """The CLIPTextModel a transformers config.json describes (CLIPTextConfig's defaults for absent fields)."""
  architectures = config.get('architectures') or []
  if len(architectures) != 1 or architectures[0] not in ARCHITECTURES:
    raise ValueError(f'{where} describes {architectures!r}; cm_jax reads one of {list(ARCHITECTURES)} (a CLIP text '
                     'encoder folder such as Stable Diffusion\'s text_encoder).')
  projection = int(config.get('projection_dim', 512)) if architectures[0] == 'CLIPTextModelWithProjection' else None
  return text_module(config, projection, where)


def text_module(config: dict, projection_dim: int | None, where: str) -> CLIPTextModel:
  """The CLIPTextModel of a CLIPTextConfig's fields (its defaults for absent ones; also a CLIPModel's text_config),
  with a text_projection to projection_dim unless None."""
  hidden_act = activation(config, where)
  transformer = CLIPTextTransformer(
      vocab_size=int(config.get('vocab_size', 49408)), width=int(config.get('hidden_size', 512)),
      intermediate_size=int(config.get('intermediate_size', 2048)),
      num_layers=int(config.get('num_hidden_layers', 12)), num_heads=int(config.get('num_attention_heads', 8)),
      max_positions=int(config.get('max_position_embeddings', 77)), hidden_act=hidden_act,
      layer_norm_eps=float(config.get('layer_norm_eps', 1e-5)), eos_token_id=int(config.get('eos_token_id', 49407)))
  return CLIPTextModel(transformer, projection_dim)


class TextEncoder:
  """A frozen CLIP text encoder with its parameters: encoder(input_ids [B, L] int) -> CLIPTextModel's output dict.

  `apply(params, input_ids)` is the pure function for use inside other jitted steps; __call__ is it jit-compiled
  with this encoder's parameters.
  """

  def __init__(self, module: CLIPTextModel, params, config: dict, path: str):
    self.module, self.params, self.config, self.path = module, params, config, path
    self._apply = jax.jit(self.apply)

  def apply(self, params, input_ids) -> dict:
    """CLIPTextModel's outputs for input_ids [B, L] (L <= max_position_embeddings)."""
    return self.module.apply({'params': params}, input_ids)

  def __call__(self, input_ids) -> dict:
    return self._apply(self.params, jnp.asarray(input_ids, jnp.int32))


def _flax_names(state_dict: dict) -> dict:
  """transformers' CLIP keys in the converter's terms: the position_ids buffer dropped, 'text_model.' restored where
  transformers 5 omits it."""
  out = {}
  for key, value in state_dict.items():
    if key.endswith('position_ids'):
      continue
    if not key.startswith(('text_model.', 'text_projection.')):
      key = 'text_model.' + key
    out[key] = value
  return out


def load_text_encoder(path) -> TextEncoder:
  """The CLIP text encoder of a transformers folder (config.json + model.safetensors), in float32."""
  folder = epath.Path(path)
  config_path = folder / diffusers_format.CONFIG_FILE
  config = diffusers_format.read_json(config_path)
  module = module_from_config(config, str(config_path))
  state_dict, where = diffusers_format.read_weights(folder, diffusers_format.TRANSFORMERS_STEM)
  return text_encoder(module, state_dict, config, where, str(folder))


def text_encoder(module: CLIPTextModel, state_dict: dict, config: dict, where: str, path: str) -> TextEncoder:
  """The TextEncoder of `module` with the tensors of a transformers state dict (text_model.* and text_projection.*;
  the prefix may be absent) read from `where`."""
  abstract = jax.eval_shape(module.init, jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))
  params = diffusers_format.from_diffusers(_flax_names(state_dict), abstract['params'], where)
  return TextEncoder(module, params, config, path)


def load_tokenizer(path) -> Any:
  """transformers' CLIPTokenizer of a folder holding vocab.json and merges.txt (e.g. Stable Diffusion's tokenizer), or
  the tokenizer.json that transformers 5's save_pretrained writes in their place."""
  folder = epath.Path(path)
  missing = [name for name in TOKENIZER_FILES if not (folder / name).exists()]
  if missing and not (folder / 'tokenizer.json').exists():
    raise ValueError(f'{folder} lacks {" and ".join(missing)}: a CLIP tokenizer folder holds {list(TOKENIZER_FILES)}.')
  from transformers import CLIPTokenizer  # pylint: disable=g-import-not-at-top
  return CLIPTokenizer.from_pretrained(str(folder))


def _bytes_to_unicode() -> list[str]:
  """The 256 printable characters byte-level BPE maps bytes onto (GPT-2 / CLIP's table)."""
  keep = list(range(ord('!'), ord('~') + 1)) + list(range(ord('¡'), ord('¬') + 1)) + list(range(ord('®'), ord('ÿ') + 1))
  chars, extra = [], 0
  for b in range(256):
    if b in keep:
      chars.append(chr(b))
    else:
      chars.append(chr(256 + extra))
      extra += 1
  return chars


def write_tokenizer(folder, words) -> epath.Path:
  """A CLIPTokenizer folder whose byte-level BPE spells each of `words` as one token: the 512 byte tokens (with and
  without '</w>'), the merges of `words`, the two specials (a vocabulary made here, where none can be downloaded)."""
  from transformers import CLIPTokenizer  # pylint: disable=g-import-not-at-top
  folder = epath.Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  base = _bytes_to_unicode()
  vocab = base + [c + '</w>' for c in base]
  merges = []
  for word in words:
    pieces = list(word[:-1]) + [word[-1] + '</w>']
    while len(pieces) > 1:
      merges.append(f'{pieces[0]} {pieces[1]}')
      pieces = [pieces[0] + pieces[1]] + pieces[2:]
      if pieces[0] not in vocab:
        vocab.append(pieces[0])
  merges = list(dict.fromkeys(merges))
  vocab += ['<|startoftext|>', '<|endoftext|>']
  (folder / 'vocab.json').write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
  (folder / 'merges.txt').write_text('#version: 0.2\n' + '\n'.join(merges) + '\n')
  tokenizer = CLIPTokenizer(str(folder / 'vocab.json'), str(folder / 'merges.txt'), model_max_length=77,
                            pad_token='<|endoftext|>')
  tokenizer.save_pretrained(str(folder))
  return folder


def tokenize(tokenizer, prompts, max_length: int = 77) -> np.ndarray:
  """int32 ids [B, max_length]: <|startoftext|> prompt <|endoftext|>, padded with the tokenizer's pad token;
  a longer prompt is truncated (its end-of-text token kept), with one warning counting the truncated prompts."""
  prompts = [prompts] if isinstance(prompts, str) else list(prompts)
  lengths = [len(ids) for ids in tokenizer(prompts, verbose=False)['input_ids']]
  truncated = sum(n > max_length for n in lengths)
  if truncated:
    logging.warning('%d of %d prompts are longer than %d tokens and were truncated (the longest has %d).',
                    truncated, len(prompts), max_length, max(lengths))
  ids = tokenizer(prompts, padding='max_length', max_length=max_length, truncation=True)['input_ids']
  return np.asarray(ids, np.int32)
