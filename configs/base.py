"""Defaults shared by every experiment; each experiment config starts from `get_config()` and changes fields.

Not an experiment itself. Every field is read somewhere; a misspelt override (--config.tran.num_steps=1) fails.
"""

import ml_collections

from cm_jax.objectives import objective_config


def get_config():
  c = ml_collections.ConfigDict()
  c.seed = 0

  # workers: grain worker processes that read and decode each host's batches (0: one thread in the trainer's process,
  # enough for in-memory sets). Decoding holds the GIL, so one process reads ~6.5k ImageNet-64 PNGs/s: raise it on
  # TPU/GPU hosts with spare cores when the input share of the step (benchmarks/input_pipeline.py) is above a few %.
  # Captioned sets (data/captions.py: captioned_digits, captioned_folder, webdataset, TFDS with a text feature):
  # caption_key names the caption field ('': 'text', else 'caption'); resample the resize filter of their images
  # ('bilinear' as diffusers' scripts, 'bicubic', 'lanczos').
  c.data = ml_collections.ConfigDict(dict(
      name='digits', split='train', data_dir='', path='', image_size=0, num_records=0, seed=0, workers=0,
      caption_key='', resample='bilinear'))

  # A residual MLP on the flattened 8x8 digits: on a 2-core CPU a UNet of useful width runs at ~5 steps/s,
  # this at ~30 (BUILD_NOTES.md). Image experiments set a UNet (models/unet.py).
  # num_classes > 0: class-conditional; a label < 0 is "no label", and label_dropout drops training labels with that
  # probability (the unconditional branch classifier-free guidance needs). adaptive_norm: 'shift', 'scale_shift' or
  # 'double' (every network). guidance_embedding: a guidance-scale input s (sCD students of a guided teacher).
  c.model = ml_collections.ConfigDict(dict(
      name='mlp', hidden=256, depth=4, dropout=0.0, num_classes=0, label_dropout=0.0, guidance_embedding=False,
      time_embedding='fourier', time_scale=16.0, adaptive_norm='shift'))

  c.parameterization = ml_collections.ConfigDict(dict(
      name='edm', sigma_data=0.5, sigma_min=0.002, sigma_max=80.0, rho=7.0))  # rho: Karras grids

  c.objective = objective_config(name='edm', p_mean=-1.2, p_std=1.2)

  # A distillation teacher, or the diffusion run whose row heads the quality table: an earlier run's workdir, or
  # checkpoint: a released network file instead (EDM's .pkl, the CM paper's .pt; cm_jax/releases.py).
  # init=True starts this run's network (and its EMAs and target) from the teacher's EMA parameters.
  c.teacher = ml_collections.ConfigDict(dict(workdir='', checkpoint='', init=False))

  # checkpoint: a released network file (EDM's .pkl, the CM paper's .pt) that --mode=sample|eval|fid|edit read as
  # the model, with no cm_jax training, in a workdir without checkpoints (cm_jax/releases.py; not for --mode=train).
  c.init = ml_collections.ConfigDict(dict(checkpoint=''))

  c.optim = ml_collections.ConfigDict(dict(
      name='adam', learning_rate=1e-3, b1=0.9, b2=0.999, eps=1e-8, warmup_steps=0, grad_clip=0.0, weight_decay=0.0))
  c.ema = ml_collections.ConfigDict(dict(rates=(0.999,)))  # sampling EMAs; the first one is sampled

  c.train = ml_collections.ConfigDict(dict(
      batch_size=128, num_steps=10_000, log_every=100,
      nonfinite='stop'))  # 'stop': a NaN/Inf loss ends the run; 'skip': the step is dropped and counted

  c.checkpoint = ml_collections.ConfigDict(dict(every_steps=1000, max_to_keep=3, async_save=True))

  # mid_sigmas: the noise levels after sigma_max used by 2-, 3-, ... step consistency sampling; or instead
  # mid_indices: indices counted from sigma_max on the index_grid_size-point Karras grid (the CM code's ts = [0, 11, 17]
  # is mid_indices=(11,) with index_grid_size=18; set mid_sigmas=() then).
  # guidance_scale: the s given to a network with a guidance input (model.guidance_embedding); must stay 1 otherwise.
  # clip_denoised: clamp every x0 estimate of consistency sampling and editing to [-1, 1] before re-noising, as the CM
  # code does (pixel runs only).
  # flow_solver: 'euler' or 'heun' for the flow-matching ODE (sampling.FLOW_ODE, teacher_steps steps).
  # prompts (text-to-image runs): a text file, one prompt per line, that --mode=sample and the grids draw
  # (cycled to the sample count; '': the data's captions); negative_prompt: the unconditional branch of guidance
  # ('': the empty prompt).
  c.sampling = ml_collections.ConfigDict(dict(
      teacher_steps=18, mid_sigmas=(0.821,), mid_indices=(), index_grid_size=18, grid_every=0, num_grid=64,
      guidance_scale=1.0, clip_denoised=False, flow_solver='euler', prompts='', negative_prompt=''))

  # Zero-shot editing (--mode=edit, cm_jax/editing.py; CM paper Algorithm 4) with the newest checkpoint's first EMA.
  # task: 'inpaint', 'colorize', 'super_resolve', 'stroke', 'denoise' or 'interpolate'. input: a PNG, or an .npy /
  # .npz of images [N, H, W, C] in [-1, 1] ('': the first num_images images of config.data). sigmas: the decreasing
  # noise levels of the loop, in (sigma_min, sigma_max]; () = the task's default: stroke (5.38, 2.24), the others the
  # grid_size-point Karras grid from sigma_max down without sigma_min (the CM code's ts = 0..N-1).
  # mask (inpaint; 1 = generate): 'center' (the middle half of each side), 'box' (box = (top, left, height, width)),
  # or a binary PNG (0 / 255) or .npy (0 / 1) of [H, W] or [H, W, C]. patch_size: super_resolve's p (also the
  # coarse strokes made from data images). noise_sigma: the noise level of denoise's input (data images get that
  # noise added). num_points: interpolate's points per pair of noises (num_images pairs).
  c.edit = ml_collections.ConfigDict(dict(
      task='inpaint', input='', num_images=8, sigmas=(), grid_size=18, mask='center', box=(0, 0, 0, 0),
      patch_size=4, noise_sigma=0.5, num_points=8))

  # The data space. autoencoder '': pixels. Else a diffusers AutoencoderKL folder or a cm_jax autoencoder run: the
  # model works on its latents, encoded on the fly in the train step, or read from `cache` (a directory written once
  # by --mode=encode). posterior: 'mean' or 'sample' of the encoder (on the fly, or from a text-to-image cache's
  # moments). normalization: 'scaling_factor' ((z - shift) * scale, the autoencoder's own), 'per_channel' /
  # 'per_element' ((z - mu) / s * 0.5 with the cache's statistics).
  # pipeline: a diffusers Stable Diffusion pipeline folder instead (cm_jax/text_latents.py): its VAE's latents, its
  # text encoder(s) conditioning model.name='sd_unet' on the captions of a captioned data set, each caption dropped
  # to the empty prompt with probability caption_dropout in the train step.
  c.latent = ml_collections.ConfigDict(dict(
      autoencoder='', cache='', posterior='mean', normalization='scaling_factor', encode_batch_size=256,
      pipeline='', caption_dropout=0.0))

  # Low-rank adapters (LoRA) on the frozen teacher instead of training the whole network (LCM-LoRA): rank 0 is off;
  # rules: regexes of the adapted kernels' paths (like mesh.rules); each gets alpha / rank (x A) B.
  # form: 'merged' (W + alpha / rank A B formed in each step: fastest when activations outnumber the kernels, as in a
  # UNet) or 'unmerged' (x W + alpha / rank (x A) B per layer: no full-size kernel copy or kernel gradient).
  c.lora = ml_collections.ConfigDict(dict(rank=0, alpha=1.0, rules=(r'kernel$',), form='merged'))

  # Experiment trackers besides TensorBoard (always on): Weights & Biases with mode 'online' or 'offline' (the
  # `wandb` extra); 'off' by default. A restarted run continues the same W&B run (WORKDIR/wandb_run_id).
  c.logging = ml_collections.ConfigDict(dict(wandb=dict(mode='off', project='cm_jax', entity='')))

  # The digits proxy table printed at the end of training (and by --mode=eval).
  # fid (--mode=fid): num_samples samples at each of the sampler's step counts (eval.steps; a diffusion run:
  # sampling.teacher_steps) streamed through a feature network on every device: extractor 'inception' (the FID
  # Inception-v3; inception_weights: the local path of pt_inception-2015-12-05-6726825d.pth) or 'digits' (the proxy
  # classifier). reference: an .npz with mu and sigma (the official evaluators' format); if the file does not exist it
  # is computed from config.data's reference_split and written there ('': WORKDIR/fid/reference_<extractor>_<data>_
  # <split>.npz). batch_size 0: train.batch_size. The partial statistics are saved every save_every batches, so an
  # interrupted evaluation continues where it stopped.
  # clip: --mode=fid of a text-to-image run also writes the CLIP score (100 max(cos, 0), evaluation/clip_score.py) of
  # num_samples samples (0: fid.num_samples; fid's seed and batches) and their prompts when model is the local path of
  # a transformers CLIPModel folder (config.json, model.safetensors, tokenizer files); '' is off.
  c.eval = ml_collections.ConfigDict(dict(
      proxy=False, num_samples=1000, steps=(1, 2),
      fid=dict(extractor='inception', inception_weights='', reference='', reference_split='train',
               num_samples=50_000, batch_size=0, save_every=20, seed=0),
      clip=dict(model='', num_samples=0)))

  # Device mesh: axis name -> size (-1: the rest). Every device takes a slice of the batch. `rules` shard the
  # parameters, their EMAs, the target and the optimiser state alike: (regex searched in the leaf's
  # '/'-joined state path, spec of its trailing dimensions); leaves under `min_size` elements are replicated.
  # The default splits the input-feature axis of every kernel (dense [in, out], conv [h, w, in, out]) over
  # `fsdp`; with fsdp=1 that changes nothing. Fully sharded data parallel over 8 devices:
  #   --config.mesh.shape.data=1 --config.mesh.shape.fsdp=8     (or data=2 fsdp=4: 2 replicas of 4 shards)
  c.mesh = ml_collections.ConfigDict(dict(
      shape=dict(data=-1, fsdp=1), rules=((r'kernel$', ('fsdp', None)),), min_size=2**14))
  return c
