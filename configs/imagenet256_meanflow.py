"""MeanFlow (Geng et al. 2025) on class-conditional ImageNet 256x256 in Stable Diffusion's VAE latents (32x32x4):
MF-B/2, MF-L/2 or MF-XL/2 (`:b2`, `:l2`, `:xl2`; default xl2), the DiT of models/dit.py with the second time input.

Commands (a diffusers VAE folder, e.g. stabilityai/sd-vae-ft-mse, and ImageNet as imagenet/train/<wnid>/*.JPEG; the
latent cache first):
  python -m cm_jax.main --config=configs/imagenet256_meanflow.py:xl2 --workdir=runs/imagenet256_meanflow --mode=encode \
      --config.latent.autoencoder=/path/to/sd-vae-ft-mse --config.data.path=/path/to/imagenet
  python -m cm_jax.main --config=configs/imagenet256_meanflow.py:xl2 --workdir=runs/imagenet256_meanflow \
      --config.latent.autoencoder=/path/to/sd-vae-ft-mse --config.data.path=/path/to/imagenet
Pre-flight (no weights or data are read; the VAE folder's config.json is all it needs):
  python -m cm_jax.preflight --config=configs/imagenet256_meanflow.py:xl2 --topology=v5p:4x4x4 \
      --config.latent.autoencoder=/path/to/sd-vae-ft-mse --config.model.attention_kernel=flash \
      --config.mesh.shape.data=1 --config.mesh.shape.fsdp=-1
Hardware: a TPU v5p slice or 8+ 80-GB GPUs (the paper's runs: TPUs, batch 256); not run in this project.
Paper FID-50k at 1 NFE: MF-B/2 6.17, MF-L/2 3.84, MF-XL/2 3.43 (240 epochs); 2 NFE MF-XL/2 2.93 (the paper's Table 2;
the 2-NFE figure and the L/2 row as recalled here, unverified).
Settings of the official JAX code (github.com/Gsunshine/meanflow, configs/default.py, train.py): batch 256, Adam(W)
lr 1e-4 constant, betas (0.9, 0.95), weight decay 0, EMA 0.9999, logit-normal (-0.4, 1.0) for both times, r = t for
75% of the batch (flow_share), adaptive weight p = 1 with c = 0.01 (norm_eps; the paper's text says "e.g. 1e-3"),
labels dropped by the objective with probability 0.1 (the network's own label dropout off), guidance in the target
with omega = 1.0, kappa = 0.5 over t in [0, 1] (its defaults, the MF-B/4 setting of its README: effective scale 2;
the XL/2 guidance of the paper's Table 4 is not reproduced here: *unverified*), t and t - r embedded by DiT's
timestep MLP of t itself (time_scale 1), latents x 0.18215 (scaling_factor; the official code samples each cached
posterior, the cache here keeps its mean). 240 epochs of 1,281,167 images at batch 256 = 1.2M steps.
Deviations: bfloat16 compute (the official code runs float32; the objective's JVP runs float32 here), XLA attention
by default (on TPU set --config.model.attention_kernel=flash: the forward-mode flash kernel in the JVP at 256 tokens).
FSDP: dit.MESH_RULES shard every kernel's input axis and the patch embedding and label table on their hidden axis.
"""

import ml_collections

from cm_jax.models import dit
from cm_jax.objectives import objective_config
from configs import base

SIZES = {'b2': 'B', 'l2': 'L', 'xl2': 'XL'}
BATCH = 256
STEPS = 240 * 1_281_167 // BATCH


def get_config(arg: str = 'xl2'):
  if arg not in SIZES:
    raise ValueError(f'configs/imagenet256_meanflow.py:{arg}: expected one of {sorted(SIZES)}.')
  c = base.get_config()
  c.data.update(name='image_folder', path='imagenet', image_size=256)
  c.latent.update(autoencoder='sd-vae-ft-mse', cache='runs/imagenet256_latents', normalization='scaling_factor')
  c.model = ml_collections.ConfigDict(dict(
      name='dit', size=SIZES[arg], patch_size=2, depth=0, hidden=0, heads=0, mlp_ratio=4.0, num_classes=1000,
      label_dropout=0.0, time_embedding='positional', time_scale=1.0, second_time=True, dtype='bfloat16', remat='',
      attention_kernel='xla'))
  c.parameterization = ml_collections.ConfigDict(dict(name='flow_matching'))
  c.objective = objective_config(
      name='meanflow', p_mean=-0.4, p_std=1.0, flow_share=0.75, norm_p=1.0, norm_c=0.01, class_dropout=0.1,
      cfg_omega=1.0, cfg_kappa=0.5, cfg_interval=(0.0, 1.0))
  c.optim = ml_collections.ConfigDict(dict(
      name='adam', learning_rate=1e-4, b1=0.9, b2=0.95, eps=1e-8, warmup_steps=0, grad_clip=0.0, weight_decay=0.0))
  c.ema.rates = (0.9999,)
  c.train.update(batch_size=BATCH, num_steps=STEPS, log_every=1000)
  c.checkpoint.every_steps = 10_000
  c.sampling.update(grid_every=50_000, num_grid=16)
  c.eval.update(proxy=False, steps=(1, 2))
  c.mesh.rules = dit.MESH_RULES
  return c
