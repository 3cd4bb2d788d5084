"""Three of the command's modes, each f(config, workdir, devices=None) like the others (main.MODES names them all):

  sample: samples of the newest checkpoint (or of a text-to-image run's pipeline itself) to WORKDIR/samples
  eval:   the digits-proxy quality table of the newest checkpoint and its teacher
  encode: the latent cache of config.data under config.latent.autoencoder (or a text-to-image run's pipeline)
"""

import jax
import numpy as np
from etils import epath

from cm_jax import console
from cm_jax import latents
from cm_jax import writers
from cm_jax.evaluation import report
from cm_jax.experiment import Experiment, load_teacher, pipeline_config, restore_latest


def sample(config, workdir: str, devices=None):
  """Writes samples of the newest EMA parameters to workdir/samples (PNG grid and .npz); a text-to-image run
  without a checkpoint and with a diffusion objective samples its pipeline's own UNet (latent.pipeline)."""
  if config.latent.get('pipeline') and not (epath.Path(workdir) / 'checkpoints').is_dir():
    exp = Experiment(pipeline_config(config), devices)
    if exp.config.objective.name != config.objective.name:
      raise FileNotFoundError(f'No checkpoint in {workdir}: train first (--mode=train), or sample the pipeline '
                              "itself with objective.name='ddpm'.")
    params, teacher = {'unet': exp.space.pipe.unet_params}, None
  else:
    exp, state = restore_latest(config, workdir, devices)
    params = state.ema[0]
    teacher = load_teacher(config, exp, required=bool(config.lora.rank))  # LoRA adapters sample with their teacher
  out = epath.Path(workdir) / 'samples'
  for num_steps in exp.sampler.eval_steps(config):
    samples = exp.generate(params, config.eval.num_samples, num_steps, config.seed + 2,
                           None if teacher is None else teacher.params)
    writers.save_png(out / f'final_{num_steps}_step.png', writers.samples_image(samples[:config.sampling.num_grid]))
    if jax.process_index() == 0:
      with (out / f'final_{num_steps}_step.npz').open('wb') as f:
        np.savez(f, samples=samples)
    console.say(f'Wrote {len(samples)} samples ({num_steps} steps) to {out}.')


def evaluate(config, workdir: str, devices=None):
  """Prints the small-data quality table of the newest checkpoint (and of the teacher, if configured)."""
  exp, state = restore_latest(config, workdir, devices)
  return report.quality_report(exp, state, load_teacher(config, exp, required=bool(config.lora.rank)), workdir)


def encode(config, workdir: str, devices=None):
  """--mode=encode: writes config.latent.cache from config.data, the posterior means under config.latent.autoencoder
  or (latent.pipeline) a text-to-image run's VAE moments and text-encoder states (latents.write_cache); a complete
  cache of the same models and data there already is said to be there (exit 0)."""
  del workdir, devices
  latent = config.latent
  if not (latent.autoencoder or latent.get('pipeline')) or not latent.cache:
    raise ValueError('--mode=encode writes config.latent.cache from config.data through config.latent.autoencoder '
                     '(or a text-to-image run\'s latent.pipeline): set it and latent.cache.')
  cache = latents.complete_cache(config, latent.cache)
  if cache is not None:  # encoded already: nothing to do
    console.say(f'The latent cache {latent.cache} is already there: {len(cache)} records of shape {cache.shape}, of '
                f'this {"pipeline" if latent.get("pipeline") else "autoencoder"} and data.')
    return
  cache = latents.write_cache(config, latent.cache)
  console.say(f'Wrote the latent cache {latent.cache}: {len(cache)} records of shape {cache.shape}.')
