"""MeanFlow (Geng et al. 2025) from scratch on unconditional CIFAR-10 with the paper's U-Net: the average velocity
u(z_t, r, t) with one jax.jvp per step, sampled in 1 NFE (x = e - u(e, 0, 1)) and 2.

Command:
  python -m cm_jax.main --config=configs/cifar10_meanflow.py --workdir=runs/cifar10_meanflow
  python -m cm_jax.main --config=configs/cifar10_meanflow.py --workdir=runs/cifar10_meanflow --mode=fid \
      --config.eval.fid.inception_weights=/path/to/pt_inception-2015-12-05-6726825d.pth
Hardware: sized for 8 GPUs (the official PyTorch port: 8x H200 at 0.21 s per step of batch 1024, ~2 days for its
800k steps); a TPU v4-32 or v5p-16 slice takes the same global batch. Not run in this project.
Paper FID-50k at 1 NFE: 2.92 (the paper's CIFAR-10 table; /work/shared/reference/consistency_models.md records
"MeanFlow 2.92 / -": no 2-NFE figure). The official port's README: its improved v1 sampler reaches ~2.9, its released
checkpoint 2.80; the setting below is its v0, "the original configuration used in the paper".
Settings, all from the official PyTorch port of the CIFAR-10 experiments (github.com/Gsunshine/py-meanflow:
meanflow/scripts/cifar10_v0.sh, train_arg_parser.py, models/model_configs.py, train.py): Batch 1024 (128 on each of
8 GPUs), 16000 epochs of 50,000 images = 781,250 steps, Adam lr 6e-4 (betas 0.9 / 0.999, no weight decay) with a
linear warm-up over 200 epochs (9,765 steps) and then constant, EMA 0.9999 (sampled; the extra EMAs 0.99995 and
0.9996 kept too; the port updates them every 16 steps with decay^16), dropout 0.2; (t, r) from two logit-normal
(-2.0, 2.0) draws sorted so that t >= r (tr_sampler v0), r != t for 75% of the batch (ratio 0.75: flow_share 0.25),
the adaptive weight p = 0.75 with c = 1e-3 (norm_eps); no guidance (unconditional).
Network (model_configs.py 'unet'): the port's SongUNet, EDM's DDPM++ with NCSN++'s filter, parameter for parameter
(model.layout='edm' with model.second_time, models/edm.py): 128 channels, mult (2, 2, 2), 4 blocks per level,
attention at 16x16, positional sinusoids of t itself (EDM's, endpoint=True; 256 of them: noise_mult 2; time_scale 1,
t in [0, 1]), the (1, 3, 3, 1) resampling filter, the standard encoder and decoder, 'shift' adaptive norm; t and
h = t - r through the same sinusoids, concatenated before map_layer0 (512 inputs), the attention's qkv split as the
port's QKVAttention splits it; 55,929,347 parameters (the port's SongUNet with augment_dim 0; 55,932,419 with its
map_augment). Its state dict's names are the Flax paths (net.map_layer0.weight -> map_layer0/kernel); cm_jax has no
reader for the port's checkpoint files (a torch.save of dict(model=..., args=argparse.Namespace, ...)).
Deviations: EDM's augmentation pipeline (p = 0.12, its labels fed to the network: use_edm_aug, augment_dim 6, so the
port's map_augment is absent here) and the random horizontal flip of the port's data transform are not implemented
(cm_jax has no augmentation key; cf. configs/cifar10_edm.py); the initialisation is flax's (lecun-normal kernels,
conv1 / proj / aux_conv zero), the port's EDM's (xavier-uniform; conv1 / proj / aux_conv at 1e-5 of it, qkv at
sqrt(0.2)).
"""

import ml_collections

from cm_jax.objectives import objective_config
from configs import base
from configs import cifar10_edm

BATCH = 1024
STEPS = 16_000 * 50_000 // BATCH


def get_config():
  c = base.get_config()
  cifar10_edm.cifar10(c, 'ddpmpp', dropout=0.2)
  c.model.update(layout='edm', noise_mult=2, resample_filter=(1, 3, 3, 1), second_time=True, interval_init='normal')
  c.parameterization = ml_collections.ConfigDict(dict(name='flow_matching'))
  c.objective = objective_config(
      name='meanflow', p_mean=-2.0, p_std=2.0, flow_share=0.25, norm_p=0.75, norm_c=1e-3)
  c.optim = ml_collections.ConfigDict(dict(
      name='adam', learning_rate=6e-4, b1=0.9, b2=0.999, eps=1e-8, warmup_steps=200 * 50_000 // BATCH,
      grad_clip=0.0, weight_decay=0.0))
  c.ema.rates = (0.9999, 0.99995, 0.9996)
  c.train.update(batch_size=BATCH, num_steps=STEPS, log_every=1000)
  c.checkpoint.every_steps = 10_000
  c.sampling.grid_every = 50_000
  c.eval.steps = (1, 2)
  return c
