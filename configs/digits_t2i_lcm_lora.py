"""Text-to-image LCM-LoRA on the captioned digits: rank-16 adapters on every kernel of the frozen digits_t2i_ddpm
teacher, no w input (guidance s = 2 distilled in), the online network as the target.

Commands (the teacher first, see configs/digits_t2i_ddpm.py):
  python -m cm_jax.main --config=configs/digits_t2i_lcm_lora.py --workdir=runs/digits_t2i_lcm_lora \
      --config.teacher.workdir=runs/digits_t2i_ddpm
  python -m cm_jax.main --config=configs/digits_t2i_lcm_lora.py --workdir=runs/digits_t2i_lcm_lora --mode=export
Hardware: 2 CPU cores (BUILD_NOTES.md).
Expected: the digits-proxy table of the teacher (DDIM) and LCM-LoRA at 1, 2 and 4 LCM steps; the export is
pytorch_lora_weights.safetensors for the digits pipeline.
"""

import ml_collections

from cm_jax.objectives import objective_config
from configs import digits_t2i_ddpm


def get_config():
  c = digits_t2i_ddpm.get_config()
  c.teacher.workdir = 'runs/digits_t2i_ddpm'
  c.latent.caption_dropout = 0.0
  c.objective = objective_config(
      name='lcd', skip=20, guidance_scale=(2.0, 2.0), target_ema=0.0, distance='l2', distance_c=0.0)
  c.lora = ml_collections.ConfigDict(dict(c.lora, rank=16, alpha=16.0, rules=(r'kernel$',)))
  c.ema.rates = (0.0,)
  c.sampling.guidance_scale = 1.0
  c.train.num_steps = 3000
  c.optim.learning_rate = 1e-4
  return c
