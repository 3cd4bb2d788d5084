"""The CM paper's released ImageNet-64 consistency models, sampled and scored with no cm_jax training: arg cd_lpips
(default), cd_l2 or ct chooses the checkpoint (openai/consistency_models README).

Commands (download the file to weights/, or point --config.init.checkpoint at it; --mode=fid also needs the Inception
weights, config.eval.fid.inception_weights, and the ImageNet-64 TFDS set for its reference statistics):
  python -m cm_jax.main --config=configs/imagenet64_cm_release.py:cd_lpips --workdir=runs/cm_release_cd_lpips \\
    --mode=fid --config.eval.fid.inception_weights=weights/pt_inception-2015-12-05-6726825d.pth
  python -m cm_jax.main --config=configs/imagenet64_cm_release.py:ct --workdir=runs/cm_release_ct --mode=sample
The workdir holds no checkpoints: the model is the file's (cm_jax/releases.py, init.checkpoint).
The network is the CM code's UNet (models/guided_diffusion.py, checkpoints.CM_CONFIGS['imagenet64']), float32
compute (the layout runs in float32 only; the code samples with --use_fp16 True), the consistency function with
sigma_min 0.002, sigma_max 80, sigma_data 0.5; every x0 clamped to [-1, 1] (scripts/image_sample.py
clip_denoised=True). 2-step sampling at the index the CM code's
ternary search found (scripts/launch.sh): CD "--ts 0,22,39 --steps 40" (index 22 of the 40-point grid, sigma 1.382),
CT "--ts 0,106,200 --steps 201". The objective section only selects the consistency sampler (nothing is trained).
Published FID (CM paper, 50k samples, 1 step / 2 steps): CD-LPIPS 6.20 / 4.70, CT 13.0 / 11.1; CD-L2: none in the
paper's ImageNet-64 table.
"""

import ml_collections

from cm_jax.models import checkpoints
from cm_jax.objectives import objective_config
from configs import base
from configs import imagenet64_edm

# arg -> (file name, 2-step index, grid size)
RELEASES = {'cd_lpips': ('cd_imagenet64_lpips.pt', 22, 40), 'cd_l2': ('cd_imagenet64_l2.pt', 22, 40),
            'ct': ('ct_imagenet64.pt', 106, 201)}


def release(c, name: str, index: int, grid: int):
  """Sets the consistency sampler of a CM-paper release named `name` (in weights/) on config c."""
  c.init = ml_collections.ConfigDict(dict(checkpoint=f'weights/{name}'))
  c.objective = objective_config(name='cd', num_scales=grid, solver='heun', target_ema=0.0, distance='l2')
  c.sampling.mid_sigmas = ()
  c.sampling.mid_indices = (index,)
  c.sampling.index_grid_size = grid
  c.sampling.clip_denoised = True
  c.eval.steps = (1, 2)


def get_config(arg='cd_lpips'):
  if arg not in RELEASES:
    raise ValueError(f'configs/imagenet64_cm_release.py:{arg}: expected one of {sorted(RELEASES)}.')
  c = base.get_config()
  imagenet64_edm.imagenet64(c, dropout=0.0)
  c.model = ml_collections.ConfigDict(dict(checkpoints.CM_CONFIGS['imagenet64'][1], dtype='float32'))
  release(c, *RELEASES[arg])
  c.train.batch_size = 256  # the batch of sampling and of --mode=fid (eval.fid.batch_size 0)
  return c
