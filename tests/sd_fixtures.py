"""Tiny Stable Diffusion pipelines in the real formats, written with diffusers' and transformers' save_pretrained.

Random weights, sizes small enough for a CPU test; every component is a real diffusers / transformers class, so a
loader that reads these folders reads a released pipeline the same way. The CLIP tokenizer is a real byte-level BPE
(vocab.json + merges.txt in CLIP's layout) over a few words, since no released vocabulary can be downloaded here.
"""

import pathlib

from cm_jax.models import clip_text

WORDS = ('a', 'photo', 'of', 'cat', 'dog', 'handwritten', 'seven', 'the', 'digit', 'astronaut')


def write_clip_tokenizer(folder) -> pathlib.Path:
  """A CLIPTokenizer folder over WORDS (clip_text.write_tokenizer)."""
  return pathlib.Path(clip_text.write_tokenizer(folder, WORDS))


def _perturbed(module, seed: int):
  """`module` with every parameter moved by N(0, 0.02^2): zero-initialised layers (conv_out, biases) must not hide
  a wrong connection."""
  import torch  # pylint: disable=g-import-not-at-top
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in module.parameters():
      p.add_(0.02 * torch.randn(p.shape, generator=generator))
  return module.eval()


def _text_encoder(projection: bool, hidden_act: str, seed: int, hidden_size: int = 32):
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  torch.manual_seed(seed)
  config = transformers.CLIPTextConfig(vocab_size=551, hidden_size=hidden_size, intermediate_size=37,
                                       num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=77,
                                       hidden_act=hidden_act, projection_dim=24, bos_token_id=549, eos_token_id=550,
                                       pad_token_id=550)
  cls = transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel
  return _perturbed(cls(config), seed)


UNETS = {
    # SD 1.x: heads = attention_head_dim = 8 everywhere (diffusers' legacy reading), conv proj_in/proj_out.
    'sd15': dict(block_out_channels=(32, 64), layers_per_block=2, cross_attention_dim=32, attention_head_dim=8),
    # SD 2.x: a per-block head size, linear projections, upcast attention (and v-prediction in its scheduler).
    'sd21': dict(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32, attention_head_dim=(4, 8),
                 use_linear_projection=True, upcast_attention=True),
    # SDXL: two text towers (32 + 48 = 80 features), text_time with the pooled 24-d projection and six time ids.
    'sdxl': dict(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=80, attention_head_dim=(2, 4),
                 use_linear_projection=True, transformer_layers_per_block=(1, 2), addition_embed_type='text_time',
                 addition_time_embed_dim=8, projection_class_embeddings_input_dim=24 + 6 * 8),
}


def write_pipeline(folder, family: str, seed: int = 0) -> pathlib.Path:
  """A tiny `family` ('sd15', 'sd21', 'sdxl') pipeline saved by diffusers; returns the folder."""
  import diffusers  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  folder = pathlib.Path(folder)
  torch.manual_seed(seed)
  unet = _perturbed(diffusers.UNet2DConditionModel(
      sample_size=8, in_channels=4, out_channels=4, norm_num_groups=8,
      down_block_types=('CrossAttnDownBlock2D', 'DownBlock2D'), up_block_types=('UpBlock2D', 'CrossAttnUpBlock2D'),
      **UNETS[family]), seed + 1)
  vae = _perturbed(diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=8,
                                           block_out_channels=(8, 16),
                                           down_block_types=('DownEncoderBlock2D',) * 2,
                                           up_block_types=('UpDecoderBlock2D',) * 2), seed + 2)
  scheduler = diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule='scaled_linear',
                                      prediction_type='v_prediction' if family == 'sd21' else 'epsilon',
                                      clip_sample=False, set_alpha_to_one=False, steps_offset=1)
  from transformers import CLIPTokenizer  # pylint: disable=g-import-not-at-top
  tokenizer = CLIPTokenizer.from_pretrained(str(write_clip_tokenizer(folder / 'tokenizer')))
  if family == 'sdxl':
    pipe = diffusers.StableDiffusionXLPipeline(
        vae=vae, unet=unet, scheduler=scheduler, tokenizer=tokenizer, tokenizer_2=tokenizer,
        text_encoder=_text_encoder(False, 'quick_gelu', seed + 3),
        text_encoder_2=_text_encoder(True, 'gelu', seed + 4, hidden_size=48))
  else:
    pipe = diffusers.StableDiffusionPipeline(
        vae=vae, unet=unet, scheduler=scheduler, tokenizer=tokenizer,
        text_encoder=_text_encoder(False, 'gelu' if family == 'sd21' else 'quick_gelu', seed + 3),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
  pipe.save_pretrained(str(folder))
  return folder
