"""--mode=export: a trained text-to-image run (latent.pipeline) in the files diffusers loads, under WORKDIR/export.

  LoRA run (lora.rank > 0): export/pytorch_lora_weights.safetensors, the first EMA's adapters with PEFT keys
      (formats/lora.py): pipe.load_lora_weights('WORKDIR/export') on the source pipeline.
  whole-network run: export/ is a diffusers pipeline folder: the source pipeline's components, the first EMA's UNet
      (with time_cond_proj_dim for a student with LCM's w input) and, for a consistency model, an LCMScheduler config
      on the run's grid: DiffusionPipeline.from_pretrained('WORKDIR/export').
"""

import jax
from etils import epath

from cm_jax import console
from cm_jax import experiment
from cm_jax.formats import diffusers as diffusers_format
from cm_jax.formats import lora as lora_format
from cm_jax.objectives.lora import adapter_scale

EXPORT = 'export'
_SCHEDULER_KEYS = ('num_train_timesteps', 'beta_start', 'beta_end', 'beta_schedule', 'prediction_type')


def lcm_scheduler(source: dict, process, skip: int) -> dict:
  """diffusers' LCMScheduler config of a latent consistency model: the source scheduler's betas and prediction type,
  the solver grid of the skipping step (original_inference_steps = T / k), LCM's boundary timestep scaling."""
  return dict({k: source[k] for k in _SCHEDULER_KEYS if k in source}, _class_name='LCMScheduler',
              original_inference_steps=process.num_timesteps // skip, timestep_scaling=process.timestep_scaling,
              set_alpha_to_one=True, clip_sample=False, timestep_spacing='leading',
              steps_offset=1)  # unread by LCMScheduler; 1 keeps StableDiffusionPipeline from warning


def run(config, workdir: str, devices=None):
  """Writes WORKDIR/export from the newest checkpoint; an existing export is refused, never overwritten."""
  if not config.latent.get('pipeline'):
    raise ValueError('--mode=export writes a text-to-image run (latent.pipeline) as diffusers files; this run has '
                     'no pipeline (a latent autoencoder run exports itself to WORKDIR/autoencoder when it finishes).')
  out = epath.Path(workdir) / EXPORT
  if out.exists():
    raise ValueError(f'{out} exists; move it away to export again (an export is never overwritten).')
  exp, state = experiment.restore_latest(config, workdir, devices)
  params, pipe = jax.device_get(state.ema[0]), exp.space.pipe
  if jax.process_index() != 0:
    return
  if config.lora.rank:
    written = lora_format.write_lora(out, params['unet'], adapter_scale(config.lora))
  else:
    source = diffusers_format.read_json(epath.Path(pipe.path) / diffusers_format.SCHEDULER_CONFIG)
    scheduler = None if exp.sampler.diffusion else lcm_scheduler(source, exp.process, int(config.objective.skip))
    diffusers_format.write_pipeline(out, pipe.path, params['unet'], exp.model.diffusers_config(pipe.unet_config),
                                    scheduler)
    written = out
  console.say(f'Exported step {int(state.step)} to {written}.')
