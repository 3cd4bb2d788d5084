"""LCM-LoRA for SDXL base: rank-64 adapters on the frozen SDXL UNet at 1024 px (both text towers, pooled embedding
and time ids), no w-embedding, online target; see configs/sd15_lcm_lora.py for the recipe and the export.

Command:
  python -m cm_jax.main --config=configs/sdxl_lcm_lora.py --workdir=runs/sdxl_lcm_lora \
      --config.latent.pipeline=/path/to/sdxl-base --config.data.path='/data/laion/{00000..00999}.tar'
Hardware: a v5p-16 slice or 8 80-GB GPUs with FSDP (--config.mesh.shape.data=1 --config.mesh.shape.fsdp=-1);
batch 8 per chip, bf16 compute, remat. Not pre-flighted: its compile needs more than a 24 GiB host (the SDXL
DDPM step on v5p:2x2x1 with fsdp=4 and 8 per chip: 78.3 / 95 GiB per chip, 57% MFU, BUILD_NOTES).
Published (LCM-LoRA paper, SDXL): 1-4 step samples; no FID table.
"""

from configs import sd15_lcm_lora


def get_config():
  c = sd15_lcm_lora.sd_latent_consistency(1024, lora=True)
  c.train.batch_size = 64
  return c
