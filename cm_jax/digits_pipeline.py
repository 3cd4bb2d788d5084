"""The built-in text-to-image pipeline of the captioned digits (latent.pipeline='digits'): a diffusers pipeline folder
of pixels (no VAE), written once under ~/.cache/cm_jax and read like any other pipeline:

  tokenizer/     a CLIP byte-level BPE whose vocabulary spells the captions' words (clip_text.write_tokenizer)
  text_encoder/  a frozen CLIPTextModel with random weights (seed 0): untrained, it still gives each caption its own
                 states, which is all a conditional model needs to tell the captions apart
  unet/          the small UNet2DConditionModel the digits teacher trains from scratch (its initial weights)
  scheduler/     DDIM on Stable Diffusion's scaled-linear betas, epsilon prediction

The folder is a function of VERSION alone: every process and machine makes the same one.
"""

import json
import os
import re
import shutil

from etils import epath
import jax
import jax.numpy as jnp

from cm_jax.data import captions
from cm_jax.formats import diffusers as diffusers_format
from cm_jax.models import clip_text
from cm_jax.models import sd_unet

VERSION = 1
CACHE_DIR = os.path.expanduser('~/.cache/cm_jax')
UNET = dict(_class_name=sd_unet.CLASS_NAME, sample_size=8, in_channels=1, out_channels=1, block_out_channels=[32, 64],
            layers_per_block=1, down_block_types=['CrossAttnDownBlock2D', 'DownBlock2D'],
            up_block_types=['UpBlock2D', 'CrossAttnUpBlock2D'], cross_attention_dim=64, attention_head_dim=4,
            norm_num_groups=8)
SCHEDULER = dict(_class_name='DDIMScheduler', num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                 beta_schedule='scaled_linear', prediction_type='epsilon', clip_sample=False, set_alpha_to_one=False,
                 steps_offset=1, timestep_spacing='trailing')
INDEX = dict(_class_name='StableDiffusionPipeline', vae=[None, None], text_encoder=['transformers', 'CLIPTextModel'],
             tokenizer=['transformers', 'CLIPTokenizer'], unet=['diffusers', 'UNet2DConditionModel'],
             scheduler=['diffusers', 'DDIMScheduler'], safety_checker=[None, None], feature_extractor=[None, None],
             requires_safety_checker=False)


def words() -> list[str]:
  """The words of every caption of the captioned digits."""
  all_captions = (captions.digit_caption(d, p) for d in range(10) for p in range(len(captions.PHRASINGS)))
  return sorted({w for c in all_captions for w in re.findall(r'[a-z]+', c.lower())})


def write(folder) -> None:
  """Writes the pipeline into `folder` (model_index.json last)."""
  folder = epath.Path(folder)
  tokenizer = clip_text.load_tokenizer(clip_text.write_tokenizer(folder / 'tokenizer', words()))
  eos = tokenizer.convert_tokens_to_ids('<|endoftext|>')
  text = dict(architectures=['CLIPTextModel'], model_type='clip_text_model', vocab_size=len(tokenizer),
              hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=77, hidden_act='quick_gelu', layer_norm_eps=1e-5,
              bos_token_id=tokenizer.convert_tokens_to_ids('<|startoftext|>'), eos_token_id=eos, pad_token_id=eos)
  encoder = clip_text.module_from_config(text, 'the digits text encoder')
  params = encoder.init(jax.random.PRNGKey(0), jnp.zeros((1, 77), jnp.int32))['params']
  diffusers_format.write_model(folder / 'text_encoder', params, text, stem=diffusers_format.TRANSFORMERS_STEM)
  unet = sd_unet.module_from_config(UNET, 'the digits UNet')
  args, kwargs = unet.example_inputs()
  sd_unet.export_unet(folder / 'unet', UNET, unet.init(jax.random.PRNGKey(1), *args, **kwargs)['params'])
  (folder / 'scheduler').mkdir(parents=True, exist_ok=True)
  (folder / diffusers_format.SCHEDULER_CONFIG).write_text(json.dumps(SCHEDULER, indent=2))
  (folder / diffusers_format.PIPELINE_INDEX).write_text(json.dumps(INDEX, indent=2))


def ensure() -> epath.Path:
  """The pipeline's folder, written first if it is not there (into a staging folder renamed into place, so
  processes that race leave one whole folder)."""
  cache = epath.Path(CACHE_DIR)
  folder = cache / f'digits_pipeline_v{VERSION}'
  if (folder / diffusers_format.PIPELINE_INDEX).exists():
    return folder
  staging = cache / f'.digits_pipeline_v{VERSION}.{os.getpid()}'
  write(staging)
  try:
    staging.rename(folder)
  except OSError:  # another process renamed its copy first
    shutil.rmtree(staging, ignore_errors=True)
    if not (folder / diffusers_format.PIPELINE_INDEX).exists():
      raise
  return folder
