"""The public architectures of Stable Diffusion 1.5, 2.1-base and SDXL base: their diffusers config files, no weights.

Each entry of ARCHITECTURES holds what a pipeline folder's config files say about the networks (the values of the
released `unet/config.json`, `vae/config.json`, `text_encoder*/config.json` and `scheduler/scheduler_config.json`
of stable-diffusion-v1-5, stabilityai/stable-diffusion-2-1-base and stabilityai/stable-diffusion-xl-base-1.0; keys
left at diffusers' / transformers' defaults are omitted). The pre-flight (cm_jax/preflight.py) builds a
text-to-image run's space and network from them when the config names no latent.pipeline, so that the SD UNet's train
step compiles for a TPU topology without the user's weights: `--sd_architecture=sd15|sd21_base|sdxl`.
"""

_SD_BLOCKS = dict(
    down_block_types=['CrossAttnDownBlock2D', 'CrossAttnDownBlock2D', 'CrossAttnDownBlock2D', 'DownBlock2D'],
    up_block_types=['UpBlock2D', 'CrossAttnUpBlock2D', 'CrossAttnUpBlock2D', 'CrossAttnUpBlock2D'])
_UNET_COMMON = dict(_class_name='UNet2DConditionModel', act_fn='silu', center_input_sample=False,
                    downsample_padding=1, flip_sin_to_cos=True, freq_shift=0, in_channels=4, out_channels=4,
                    mid_block_scale_factor=1, norm_eps=1e-5, norm_num_groups=32, layers_per_block=2)

# The KL-f8 VAE of every release here (SDXL's differs in weights and scaling_factor only).
_VAE = dict(_class_name='AutoencoderKL', act_fn='silu', block_out_channels=[128, 256, 512, 512],
            down_block_types=['DownEncoderBlock2D'] * 4, up_block_types=['UpDecoderBlock2D'] * 4, in_channels=3,
            out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32, sample_size=512,
            scaling_factor=0.18215)

# CLIP text towers (transformers CLIPTextConfig values).
_CLIP_L = dict(architectures=['CLIPTextModel'], vocab_size=49408, hidden_size=768, intermediate_size=3072,
               num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77, hidden_act='quick_gelu',
               layer_norm_eps=1e-5, projection_dim=768, bos_token_id=0, eos_token_id=2, pad_token_id=1)
# OpenCLIP ViT-H/14's text tower as SD 2.x ships it: 23 of its 24 layers (the penultimate layer is what SD 2 reads).
_OPENCLIP_H = dict(architectures=['CLIPTextModel'], vocab_size=49408, hidden_size=1024, intermediate_size=4096,
                   num_hidden_layers=23, num_attention_heads=16, max_position_embeddings=77, hidden_act='gelu',
                   layer_norm_eps=1e-5, projection_dim=512, bos_token_id=0, eos_token_id=2, pad_token_id=1)
# OpenCLIP ViT-bigG/14's text tower, SDXL's text_encoder_2 (with the pooled projection).
_OPENCLIP_BIGG = dict(architectures=['CLIPTextModelWithProjection'], vocab_size=49408, hidden_size=1280,
                      intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                      max_position_embeddings=77, hidden_act='gelu', layer_norm_eps=1e-5, projection_dim=1280,
                      bos_token_id=0, eos_token_id=2, pad_token_id=1)

_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule='scaled_linear',
                  prediction_type='epsilon')

ARCHITECTURES = {
    # stable-diffusion-v1-5: 860M UNet parameters, 8 heads everywhere, conv projections; CLIP ViT-L/14 text.
    'sd15': dict(
        unet=dict(_UNET_COMMON, **_SD_BLOCKS, block_out_channels=[320, 640, 1280, 1280], attention_head_dim=8,
                  cross_attention_dim=768, sample_size=64),
        vae=_VAE, text_encoders=(_CLIP_L,), scheduler=dict(_SCHEDULER, _class_name='PNDMScheduler'),
        resolution=512),
    # stable-diffusion-2-1-base: 865M, per-block head sizes 64 (heads 5, 10, 20, 20), linear projections.
    'sd21_base': dict(
        unet=dict(_UNET_COMMON, **_SD_BLOCKS, block_out_channels=[320, 640, 1280, 1280],
                  attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024, use_linear_projection=True,
                  sample_size=64),
        vae=_VAE, text_encoders=(_OPENCLIP_H,), scheduler=dict(_SCHEDULER, _class_name='PNDMScheduler'),
        resolution=512),
    # stable-diffusion-xl-base-1.0: 2.57B, three levels, 1 / 2 / 10 transformer layers, text_time conditioning
    # (pooled 1280 + 6 time ids x 256 = 2816), both text towers (768 + 1280 = 2048 cross-attention features).
    'sdxl': dict(
        unet=dict(_UNET_COMMON, block_out_channels=[320, 640, 1280],
                  down_block_types=['DownBlock2D', 'CrossAttnDownBlock2D', 'CrossAttnDownBlock2D'],
                  up_block_types=['CrossAttnUpBlock2D', 'CrossAttnUpBlock2D', 'UpBlock2D'],
                  mid_block_type='UNetMidBlock2DCrossAttn', attention_head_dim=[5, 10, 20],
                  transformer_layers_per_block=[1, 2, 10], cross_attention_dim=2048, use_linear_projection=True,
                  addition_embed_type='text_time', addition_embed_type_num_heads=64, addition_time_embed_dim=256,
                  projection_class_embeddings_input_dim=2816, sample_size=128),
        vae=dict(_VAE, sample_size=1024, scaling_factor=0.13025, force_upcast=True),
        text_encoders=(_CLIP_L, _OPENCLIP_BIGG),
        scheduler=dict(_SCHEDULER, _class_name='EulerDiscreteScheduler', timestep_spacing='leading'),
        resolution=1024),
}


def architecture(name: str) -> dict:
  """ARCHITECTURES[name]; ValueError naming the known ones."""
  if name not in ARCHITECTURES:
    raise ValueError(f'unknown Stable Diffusion architecture {name!r}; known: {sorted(ARCHITECTURES)}.')
  return ARCHITECTURES[name]


def guess(resolution: int, prediction: str = 'epsilon') -> str:
  """The release a text-to-image config most likely targets when it names none: SDXL at 1024 px, else SD 1.5
  (v-prediction: SD 2.x, whose UNet is 2.1-base's)."""
  if resolution >= 1024:
    return 'sdxl'
  return 'sd21_base' if prediction == 'v' else 'sd15'
