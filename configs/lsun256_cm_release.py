"""The CM paper's released LSUN 256x256 consistency models (bedroom, cat), sampled and scored with no cm_jax training:
arg '<set>_<method>' with set bedroom or cat and method cd_lpips (default bedroom_cd_lpips), cd_l2 or ct chooses the
checkpoint (openai/consistency_models README).

Commands (download the file to weights/, or point --config.init.checkpoint at it; --mode=fid also needs the Inception
weights and the images, data.path: root/train/<class>/*.jpg resized to 256x256, or reference statistics at
config.eval.fid.reference):
  python -m cm_jax.main --config=configs/lsun256_cm_release.py:bedroom_cd_lpips --workdir=runs/cm_release_bedroom \\
    --mode=fid --config.eval.fid.inception_weights=weights/pt_inception-2015-12-05-6726825d.pth
  python -m cm_jax.main --config=configs/lsun256_cm_release.py:cat_ct --workdir=runs/cm_release_cat_ct --mode=sample
The network is the CM code's unconditional UNet (checkpoints.CM_CONFIGS['lsun256']: 256 channels, mult
(1, 1, 2, 2, 4, 4), 2 blocks, no scale-shift norm), float32 compute (the code: fp16), sigma_min 0.002, sigma_max 80,
x0 clamped to [-1, 1]. 2-step sampling at the CM code's ternary-search indices (scripts/launch.sh): CD-LPIPS
"--ts 0,17,39 --steps 40", CD-L2 "--ts 0,18,39", CT bedroom "--ts 0,67,150 --steps 151", CT cat "--ts 0,62,150
--steps 151" (launch.sh names the CD indices for bedroom's files; cat takes the same).
Published FID (CM paper Table 3 as read, *unverified*: the reference sheet has no LSUN rows; 1 step / 2 steps):
bedroom CD-LPIPS 7.80 / 5.22, CT 16.0 / 7.85; cat CD-LPIPS 11.0 / 8.84, CT 20.7 / 11.7; CD-L2: none published.
"""

import ml_collections

from cm_jax.models import checkpoints
from configs import base
from configs import imagenet64_cm_release

# method -> (2-step index, grid size) per set; the file is <method>_<set>256.pt (CT: ct_<set>256.pt).
METHODS = {'cd_lpips': {'bedroom': (17, 40), 'cat': (17, 40)}, 'cd_l2': {'bedroom': (18, 40), 'cat': (18, 40)},
           'ct': {'bedroom': (67, 151), 'cat': (62, 151)}}


def get_config(arg='bedroom_cd_lpips'):
  data, _, method = arg.partition('_')
  if data not in ('bedroom', 'cat') or method not in METHODS:
    raise ValueError(f'configs/lsun256_cm_release.py:{arg}: expected <set>_<method> with set bedroom or cat and '
                     f'method one of {sorted(METHODS)}.')
  c = base.get_config()
  c.data.update(name='image_folder', path=f'data/lsun_{data}256', image_size=256)
  c.model = ml_collections.ConfigDict(dict(checkpoints.CM_CONFIGS['lsun256'][1], dtype='float32'))
  name = f'ct_{data}256.pt' if method == 'ct' else f'cd_{data}256_{method[3:]}.pt'
  imagenet64_cm_release.release(c, name, *METHODS[method][data])
  c.sampling.num_grid = 16
  c.eval.proxy = False
  c.train.batch_size = 32  # the sampling batch of scripts/launch.sh per process
  return c

