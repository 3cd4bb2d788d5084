"""Latent consistency distillation (LCD, Luo et al. 2023) of Stable Diffusion 2.1-base at 512 px: the whole UNet with
LCM's w-embedding (w ~ U[5, 15], dimension 256), skipping step k = 20 on the 50-step DDIM grid, EMA target 0.95,
pseudo-Huber c = 0.001; the student starts from the teacher.

Commands:
  python -m cm_jax.main --config=configs/sd21_lcd.py --workdir=runs/sd21_lcd \
      --config.latent.pipeline=/path/to/sd21-base --config.data.path='/data/laion/{00000..00999}.tar'
  python -m cm_jax.main --config=configs/sd21_lcd.py --workdir=runs/sd21_lcd --mode=export \
      --config.latent.pipeline=/path/to/sd21-base     # -> runs/sd21_lcd/export: a diffusers LCM pipeline folder
Hardware: 8 A100s (batch 96 = 12 per device) or a v5p-8 slice (4 chips: --config.train.batch_size=48 for 12 per
chip, --config.model.attention_kernel=flash), 1000+ iterations, bf16, remat (the paper: 32 A100 GPU hours for its
768 px LCM). Pre-flight (BUILD_NOTES, session 10): v5p:2x2x1, 12 per chip, flash: 28.5 / 95 GiB per chip, 318 ms
per step, 151 images/s, 51% MFU (remat included; --sd_architecture=sd21_base without a pipeline folder).
Published: the LCM paper's Table 1 (LAION-5B-Aesthetics, 512 px, w = 8) gives FID and CLIP score at 1 / 2 / 4 / 8
steps against DDIM, DPM-Solver and Guided-Distill; not reproduced here (no SD weights on this machine), and the
numbers are not copied into this file unchecked.
"""

from configs import sd15_lcm_lora


def get_config():
  return sd15_lcm_lora.sd_latent_consistency(512, lora=False)
