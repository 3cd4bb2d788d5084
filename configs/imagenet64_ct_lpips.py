"""Consistency training with LPIPS on class-conditional ImageNet-64 (CM paper), ADM, no teacher.

Command (LPIPS weights at config.objective.lpips_weights, format in cm_jax/lpips.py):
  python -m cm_jax.main --config=configs/imagenet64_ct_lpips.py --workdir=runs/imagenet64_ct_lpips
Hardware: sized for 64 A100 GPUs (count unverified, as imagenet64_cd_lpips) or a TPU v4-128 slice; bfloat16 compute
(the code: --use_fp16 True).
Batch 2048, 800k iterations, RAdam lr 1e-4, N(k) from s0 = 2 to s1 = 200, mu0 = 0.95 (official code's N(k) - 1
convention, cm/script_util.py create_ema_and_scales_fn), Euler step with the data as denoiser, EMA
0.9999432189950708, dropout 0, uniform weighting: openai/consistency_models scripts/launch.sh ("L_CT^N on
ImageNet-64"). The learning rate is the launch script's 1e-4; the previous value here, 8e-6, was an
unverified reading of the paper's Table 3, which could not be checked. That command also passes
--teacher_model_path, and scripts/cm_train.py then copies the EDM teacher into the student before training (the
loss never calls the teacher); this config keeps CT's random initialisation (the paper's definition). To replay
the launch command exactly, add --config.teacher.workdir=runs/imagenet64_edm --config.teacher.init=True.
2-step sampling at index 106 of the 201-point grid (sigma 1.913): launch.sh "--ts 0,106,200 --steps 201".
Paper FID: 1 step 13.0, 2 steps 11.1.
"""

import ml_collections

from cm_jax.objectives import objective_config
from configs import imagenet64_cd_lpips


def get_config():
  """imagenet64_cd_lpips's network, optimiser and batch, with the CT objective, no teacher, its own lr, length and
  2-step level."""
  c = imagenet64_cd_lpips.get_config()
  c.objective = objective_config(
      name='ct', s0=2, s1=200, mu0=0.95, mu_convention='code', distance='lpips',
      lpips_weights='weights/lpips_vgg16.npz')
  c.teacher = ml_collections.ConfigDict(dict(workdir='', checkpoint='', init=False))
  c.optim.learning_rate = 1e-4
  c.train.num_steps = 800_000
  c.sampling.mid_indices = (106,)
  c.sampling.index_grid_size = 201
  return c
