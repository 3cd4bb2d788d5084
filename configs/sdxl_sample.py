"""SDXL base sampled from prompts: DDIM (trailing grid) with classifier-free guidance at 1024 px, both text towers,
the pooled embedding and the time ids (1024, 1024, 0, 0, 1024, 1024).

Command (your diffusers folder of stable-diffusion-xl-base-1.0):
  python -m cm_jax.main --config=configs/sdxl_sample.py --workdir=runs/sdxl_sample --mode=sample \
      --config.latent.pipeline=/path/to/sdxl-base --config.sampling.prompts=PROMPTS.txt
Hardware: one GPU or TPU chip with 16 GB or more (bf16 compute, float32 weights: 10.3 GB of UNet parameters); two
prompts a batch.
Gives: WORKDIR/samples/final_50_step.png and .npz (see configs/sd15_sample.py).
"""

from configs import sd15_sample


def get_config():
  c = sd15_sample.sd_sampling(1024)
  c.sampling.guidance_scale = 5.0
  c.train.batch_size = 2
  c.eval.num_samples = 2
  c.sampling.num_grid = 2
  return c
