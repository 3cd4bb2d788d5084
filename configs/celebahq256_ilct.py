"""Latent iCT, the baseline of improved latent CT (Dao et al. 2025): iCT as published (pseudo-Huber over the whole
sample, no diffusion loss, independent noise, GroupNorm) on CelebA-HQ 256 in Stable Diffusion's VAE latent space.

Commands: as configs/celebahq256_lct.py, with this config (the same latent cache serves both).
Hardware: sized for 8 GPUs or a TPU v4-32 slice; batch 128, bfloat16 compute.
Batch 128, 1.4M iterations (unverified), RAdam lr 1e-4, weight decay 1e-4, eps 1e-4, EMA 0.9999, curriculum
10 -> 640, pseudo-Huber with c = 0.00054 sqrt(D) (0.0346 for D = 4096); network and data as celebahq256_lct.py.
Paper FID (1 step / 2 steps): 37.15 / 16.84, the impulsive-outlier failure that the improved recipe fixes (7.27 / 6.93).
"""

from configs import celebahq256_lct


def get_config():
  c = celebahq256_lct.get_config()
  c.objective.update(distance='pseudo_huber', c_schedule='fixed', diffusion_loss_weight=0.0, coupling='none')
  c.model.norm = 'group'
  return c
