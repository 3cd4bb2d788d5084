"""LCM-LoRA (Luo et al. 2023) on cifar10_latent_ddpm: LCD trained as rank-64 adapters (alpha 64) on every kernel of
the frozen teacher, no guidance input (one distilled scale, s = 9.5), no target network, lr 1e-4 (the reference's).

Commands (the autoencoder and the teacher first, see cifar10_latent_ddpm.py):
  python -m cm_jax.main --config=configs/cifar10_lcm_lora.py --workdir=runs/cifar10_lcm_lora
Hardware: 8 GPUs or a TPU v4-32 slice; batch 512, 20k iterations.
Batch 512, 20k iterations, Adam lr 1e-4, gradient clip 1. Only the adapters train and are checkpointed; samples use
the teacher merged with the EMA adapters; combine with another LoRA by lora.merge(teacher, (lcm, 1.0), (style, w)).
FID: no published CIFAR-10 number (see cifar10_latent_ddpm.py).
"""

import ml_collections

from cm_jax.objectives import objective_config
from configs import cifar10_latent_ddpm


def get_config():
  c = cifar10_latent_ddpm.get_config()
  c.teacher.workdir = 'runs/cifar10_latent_ddpm'
  c.objective = objective_config(
      name='lcd', skip=20, guidance_scale=(9.5, 9.5), target_ema=0.0, distance='l2', distance_c=0.0)
  c.lora = ml_collections.ConfigDict(dict(c.lora, rank=64, alpha=64.0, rules=(r'kernel$',)))
  c.model.dropout = 0.0
  c.optim.update(learning_rate=1e-4, warmup_steps=0, grad_clip=1.0)
  c.train.num_steps = 20_000
  c.sampling.guidance_scale = 1.0
  return c
