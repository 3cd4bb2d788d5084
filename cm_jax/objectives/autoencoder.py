"""The KL autoencoder of a latent space (objective 'autoencoder', model 'autoencoder_kl').

  L = mean_B[ r(x, D(z)) + kl_weight KL(q(z | x) || N(0, I)) + lpips_weight LPIPS(x, D(z)) ],  z ~ q(z | x)
r = mean_D |x - x'| ('l1') or mean_D (x - x')^2 ('l2'); KL = 0.5 mean over latent elements of
(mean^2 + exp(logvar) - 1 - logvar): both are per-dimension means, so kl_weight compares like with like.

A finished run exports itself to WORKDIR/autoencoder in the diffusers AutoencoderKL format (latents.py), with
scaling_factor = 1 / std of the posterior means over (up to objective.scale_records) training records, Stable
Diffusion's recipe, so that later runs name the run directory as their latent.autoencoder. It prints the
reconstruction error, and with eval.proxy the digits-proxy Frechet distance of reconstructed held-out digits.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath

from cm_jax import console
from cm_jax import data as data_lib
from cm_jax.data import source as source_lib
from cm_jax import distances
from cm_jax import latents
from cm_jax import sampling
from cm_jax.models.autoencoder import AutoencoderKL
from cm_jax.objectives.base import Objective

RECONSTRUCTIONS = ('l1', 'l2')


def _prior_samples(config, model, process):
  """The VAE's own samples: decode(z), z ~ N(0, I) unscaled (poor when kl_weight is small; a smoke test)."""
  del config, process

  def sample(params, rng, cond, shape, num_steps, guidance=None):
    del cond, num_steps, guidance
    z = jax.random.normal(rng, (shape[0],) + model.latent_shape(shape[1:]))
    return jnp.clip(model.apply({'params': params}, z, method=AutoencoderKL.decode), -1.0, 1.0)

  return sample


VAE_PRIOR = sampling.Sampler(lambda num_steps: 'VAE prior', _prior_samples, eval_steps=lambda c: (1,), grid_steps=lambda c: 1,
                             nfe=lambda config, num_steps: 1)


def _encode_records(autoencoder: latents.Autoencoder, source, indices, batch_size=256):
  """(images, unscaled posterior means, reconstructions from the means) of the records at `indices` (host numpy)."""
  images, means, recons = [], [], []
  for chunk in np.array_split(indices, max(1, -(-len(indices) // batch_size))):
    x = source_lib.to_model_range(source.get(chunk)['image'])
    mean = autoencoder.posterior(x)[0]
    images.append(x)
    means.append(np.asarray(mean))
    recons.append(np.clip(np.asarray(autoencoder.decode(mean)), -1.0, 1.0))
  return np.concatenate(images), np.concatenate(means), np.concatenate(recons)


def make_autoencoder(config, model, process) -> Objective:
  """The loss of the module docstring; the run exports itself when it finishes."""
  del process
  obj = config.objective
  if not isinstance(model, AutoencoderKL):
    raise ValueError(f"objective.name='autoencoder' trains model.name='autoencoder_kl', not {type(model).__name__}.")
  if obj.reconstruction not in RECONSTRUCTIONS:
    raise ValueError(f'objective.reconstruction={obj.reconstruction!r}; expected one of {RECONSTRUCTIONS}.')
  if obj.kl_weight < 0 or obj.lpips_weight < 0 or obj.scale_records < 2:
    raise ValueError('objective.kl_weight and lpips_weight must be >= 0 and objective.scale_records >= 2.')
  reconstruction = distances.get_distance(obj.reconstruction)
  perceptual = distances.get_distance('lpips') if obj.lpips_weight else None

  def loss(params, extra, inputs, batch, rng, step):
    del extra, step
    x = batch['image']
    mean, logvar = model.apply({'params': params}, x, method=AutoencoderKL.encode)
    z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape)
    recon = model.apply({'params': params}, z, method=AutoencoderKL.decode)
    rec = jnp.mean(reconstruction(recon, x))
    kl = jnp.mean(0.5 * (mean**2 + jnp.exp(logvar) - 1.0 - logvar))
    loss = rec + obj.kl_weight * kl
    metrics = {'reconstruction': rec, 'kl': kl}
    if perceptual is not None:
      metrics['lpips'] = jnp.mean(perceptual(recon, x, inputs=inputs))
      loss = loss + obj.lpips_weight * metrics['lpips']
    return loss, dict(metrics, loss=loss)

  def init_params(model_, rng, sample_input):
    return model_.init({'params': rng}, sample_input[0])['params']

  def finish(experiment, state, workdir):
    """Exports the first EMA as WORKDIR/autoencoder with its scaling factor and prints the reconstruction error;
    returns the test split's reconstructions for the quality table when eval.proxy is on."""
    params = jax.device_get(state.ema[0])
    autoencoder = latents.Autoencoder(model, params, scaling_factor=1.0, shift_factor=None, path=str(workdir))
    source = experiment.source
    indices = np.arange(min(len(source), obj.scale_records))
    images, means, recons = _encode_records(autoencoder, source, indices)
    scaling_factor = float(1.0 / np.std(means))
    folder = epath.Path(workdir) / latents.RUN_EXPORT
    if jax.process_index() == 0:
      latents.export_diffusers(folder, model, params, scaling_factor, int(source.shape[0]))
    console.say(f'Autoencoder exported to {folder}: latents {model.latent_shape(source.shape)}, scaling_factor '
                f'{scaling_factor:.4f}, reconstruction l1 {np.mean(np.abs(recons - images)):.4f} on {len(indices)} '
                'training records.')
    if not experiment.config.eval.proxy:
      return {}
    held_out = ml_collections.ConfigDict(experiment.config.data.to_dict())
    held_out.split = 'test'
    test = data_lib.build_source(held_out)
    return {'autoencoder reconstructions (test split)': _encode_records(autoencoder, test, np.arange(len(test)))[2]}

  return Objective(loss=loss, sampler=VAE_PRIOR, init_params=init_params, finish=finish,
                   inputs=distances.step_inputs('lpips' if obj.lpips_weight else '', obj.lpips_weights))
