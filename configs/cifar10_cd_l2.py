"""Consistency distillation with squared l2 on CIFAR-10 (CM paper), from the NCSN++ EDM teacher.

Command (after the teacher, as in cifar10_cd_lpips.py):
  python -m cm_jax.main --config=configs/cifar10_cd_l2.py --workdir=runs/cifar10_cd_l2
Hardware: sized for 8 A100 GPUs (count unverified, as cifar10_cd_lpips); a TPU v4-32 slice takes the same batch.
Batch 512, 800k iterations, RAdam lr 4e-4, N = 18, Heun, mu = 0, EMA 0.9999: cifar10_cd_lpips with d = l2, the
official JAX code's "CD with the l2 metric" command (openai/consistency_models_cifar10 launch.sh:
--config.optim.lr=0.0004 --config.training.loss_norm='l2'; jcm/losses.py averages the squared error per element).
Paper FID: the CM paper gives CD-l2 only in its metric ablation (a figure, no 1- and 2-step table entry), so this
config has no published number to meet; CD-LPIPS's 3.55 / 2.93 is the reference point.
"""

from configs import cifar10_cd_lpips


def get_config():
  return cifar10_cd_lpips.get_config(distance='l2')
