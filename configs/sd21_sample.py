"""Stable Diffusion 2.1-base sampled from prompts: DDIM (trailing grid) with classifier-free guidance at 512 px.

Command (your diffusers folder of stable-diffusion-2-1-base; for the 768 px v-prediction stable-diffusion-2-1 add
--config.parameterization.prediction=v --config.data.image_size=768):
  python -m cm_jax.main --config=configs/sd21_sample.py --workdir=runs/sd21_sample --mode=sample \
      --config.latent.pipeline=/path/to/sd21-base --config.sampling.prompts=PROMPTS.txt
Hardware: one GPU or TPU chip (bf16 compute, float32 weights).
Gives: WORKDIR/samples/final_50_step.png and .npz (see configs/sd15_sample.py).
"""

from configs import sd15_sample


def get_config():
  return sd15_sample.sd_sampling(512)
