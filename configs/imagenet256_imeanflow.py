"""Improved MeanFlow (iMF; Geng, Lu et al. 2025) on class-conditional ImageNet 256x256 in Stable Diffusion's VAE
latents (32x32x4): iMF-B/2 or iMF-XL/2 (`:b2`, `:xl2`; default xl2) on the DiT of models/dit.py with the second time
input and the CFG scale as a condition (objectives/imeanflow.py).

Commands (a diffusers VAE folder, e.g. stabilityai/sd-vae-ft-mse, and ImageNet as imagenet/train/<wnid>/*.JPEG; the
latent cache first, the one configs/imagenet256_meanflow.py writes):
  python -m cm_jax.main --config=configs/imagenet256_imeanflow.py:xl2 --workdir=runs/imagenet256_imeanflow \
      --mode=encode --config.latent.autoencoder=/path/to/sd-vae-ft-mse --config.data.path=/path/to/imagenet
  python -m cm_jax.main --config=configs/imagenet256_imeanflow.py:xl2 --workdir=runs/imagenet256_imeanflow \
      --config.latent.autoencoder=/path/to/sd-vae-ft-mse --config.data.path=/path/to/imagenet
Pre-flight (no weights or data are read; the VAE folder's config.json is all it needs):
  python -m cm_jax.preflight --config=configs/imagenet256_imeanflow.py:xl2 --topology=v5p:4x4x4 \
      --config.latent.autoencoder=/path/to/sd-vae-ft-mse --config.model.attention_kernel=flash \
      --config.mesh.shape.data=1 --config.mesh.shape.fsdp=-1
Hardware: a TPU v5p slice (the official code is JAX on TPUs, batch 1024); not run in this project.
Published FID-50k (the official README's table, "this repo / original paper"): iMF-B/2 3.37 / 3.39 at 1 NFE,
iMF-XL/2 1.70 / 1.72 at 1 NFE and 1.53 / 1.54 at 2 NFE.
Settings of the official code (github.com/Lyy-iiis/imeanflow: configs/default.py, configs/train_config.yml (the
iMF-B/2 run), configs/eval_config.yml, imf.py, models/imfDiT.py, utils/trainstate_util.py): batch 1024, 640 epochs of
1,281,167 images = 800,729 steps, AdamW lr 1e-4 (b2 0.95, weight decay 0) after a linear 10-epoch warm-up (12,511
steps), EMA 0.9999 constant; logit-normal (-0.4, 1.0) for both times, r = t for half of the batch (data_proportion
0.5: flow_share), p = 1 with c = 0.01 (norm_eps), labels dropped by the objective with probability 0.1, the CFG scale
omega drawn per example in [1, 1 + 7] with density ~ omega^-1 (s_max 7, cfg_beta 1) and fed to the network
(model.guidance_embedding); sampled with omega = 8.0 (eval_config.yml's recommendation for the B/2 and the XL/2
1-NFE checkpoints: sampling.guidance_scale). The repository's training config is the B/2 one; xl2 takes its recipe
(the XL/2 run's own epochs and schedule are not reproduced here: *unverified*).
Network: iMF-B/2 is 12 blocks of width 768 with 12 heads (DiT-B's shape, model.size 'B'), iMF-XL/2 48 blocks of width
1024 with 16 heads (not DiT-XL's 28 x 1152: model.size '' with depth / hidden / heads), patch 2, t and t - r embedded
by timestep MLPs of t itself (time_scale 1), the CFG scale by layers.NoiseLabelEmbedding's zero-initialised guidance
input.
Deviations (objectives/imeanflow.py's docstring): the official imfDiT conditions by in-context tokens (time, class,
omega and interval tokens) with RMSNorm, RoPE, SwiGLU and QK-norm, conditions on h = t - r alone, and has an
auxiliary v-head; cm_jax's DiT is DiT's adaLN-Zero transformer conditioned on t and t - r (so the XL/2 shape carries
more parameters than the official one's), with no second head (objective.aux_v_head=False: u(z, t, t) stands in for
the head's velocity). The official guidance interval [t_min, t_max] is drawn per example (t_min ~ U(0, 0.5), t_max ~
U(0.5, 1); [0, 1] on the r = t half) and fed to the network; no cm_jax network takes it, so the interval is fixed
here at the one eval_config.yml recommends for sampling each checkpoint at 1 NFE (B/2 [0.4, 0.65], XL/2 [0.42,
0.62]; objective.cfg_interval, cfg_interval_sampling=False). The official code normalises the latents per channel
by fixed statistics to unit variance; here x 0.18215 (scaling_factor, about the same scale) of the cached posterior
mean (the official code samples each cached posterior). bfloat16 compute (the official code runs float32; the
objective's JVP runs float32 here), XLA attention by default (on TPU set --config.model.attention_kernel=flash).
FSDP: dit.MESH_RULES shard every kernel's input axis and the patch embedding and label table on their hidden axis.
"""

import ml_collections

from cm_jax.models import dit
from cm_jax.objectives import objective_config
from configs import base

# arg -> (model.size, depth, hidden, heads, the fixed guidance interval).
SIZES = {'b2': ('B', 0, 0, 0, (0.4, 0.65)), 'xl2': ('', 48, 1024, 16, (0.42, 0.62))}
BATCH = 1024
STEPS = 640 * 1_281_167 // BATCH


def get_config(arg: str = 'xl2'):
  if arg not in SIZES:
    raise ValueError(f'configs/imagenet256_imeanflow.py:{arg}: expected one of {sorted(SIZES)}.')
  size, depth, hidden, heads, interval = SIZES[arg]
  c = base.get_config()
  c.data.update(name='image_folder', path='imagenet', image_size=256)
  c.latent.update(autoencoder='sd-vae-ft-mse', cache='runs/imagenet256_latents', normalization='scaling_factor')
  c.model = ml_collections.ConfigDict(dict(
      name='dit', size=size, patch_size=2, depth=depth, hidden=hidden, heads=heads, mlp_ratio=4.0, num_classes=1000,
      label_dropout=0.0, guidance_embedding=True, time_embedding='positional', time_scale=1.0, second_time=True,
      interval_init='normal', dtype='bfloat16', remat='', attention_kernel='xla'))
  c.parameterization = ml_collections.ConfigDict(dict(name='flow_matching'))
  c.objective = objective_config(
      name='imeanflow', p_mean=-0.4, p_std=1.0, flow_share=0.5, norm_p=1.0, norm_c=0.01, cfg_scale_max=7.0,
      cfg_beta=1.0, cfg_interval=interval, class_dropout=0.1)
  c.optim = ml_collections.ConfigDict(dict(
      name='adam', learning_rate=1e-4, b1=0.9, b2=0.95, eps=1e-8, warmup_steps=10 * 1_281_167 // BATCH,
      grad_clip=0.0, weight_decay=0.0))
  c.ema.rates = (0.9999,)
  c.train.update(batch_size=BATCH, num_steps=STEPS, log_every=1000)
  c.checkpoint.every_steps = 10_000
  c.sampling.update(grid_every=50_000, num_grid=16, guidance_scale=8.0)
  c.eval.update(proxy=False, steps=(1, 2))
  c.mesh.rules = dit.MESH_RULES
  return c
