"""Registry: `config.objective.name` -> the method's Objective."""

import functools

from cm_jax.models.apply import takes_guidance
from cm_jax.objectives.autoencoder import make_autoencoder
from cm_jax.objectives import continuous
from cm_jax.objectives.base import Objective, check_keys
from cm_jax.objectives.continuous import make_cm_continuous, make_scm
from cm_jax.objectives.ddpm import make_ddpm
from cm_jax.objectives.diffusion import make_edm, make_trigflow_diffusion
from cm_jax.objectives.discrete import make_cd, make_ct, make_ict
from cm_jax.objectives.ect import make_ect
from cm_jax.objectives import flow_matching, imeanflow, meanflow
from cm_jax.objectives.latent import make_lcd, make_lcf
from cm_jax.objectives.lora import with_lora
from cm_jax.parameterization import make_parameterization

# name -> (maker, the config.objective keys it reads, those it may read): make_objective refuses any other key.
_DISCRETE_OPTIONAL = {'lpips_weights', 'distance_c', 'c_schedule', 'diffusion_loss_weight', 'diffusion_loss_fraction',
                      'coupling', 'sinkhorn_epsilon'}
_LATENT = {'name', 'distance', 'distance_c', 'guidance_scale', 'skip', 'target_ema'}
_REGISTRY = {
    'edm': (make_edm, {'name', 'p_mean', 'p_std'}, set()),
    'trigflow': (make_trigflow_diffusion, {'name', 'p_mean', 'p_std'}, {'adaptive_weighting'}),
    'ddpm': (make_ddpm, {'name'}, set()),
    'cd': (make_cd, {'name', 'distance', 'num_scales', 'solver', 'target_ema'}, _DISCRETE_OPTIONAL),
    'ct': (make_ct, {'name', 'distance', 's0', 's1', 'mu0', 'mu_convention'}, _DISCRETE_OPTIONAL),
    'ict': (make_ict, {'name', 'distance', 's0', 's1', 'p_mean', 'p_std'}, _DISCRETE_OPTIONAL),
    'ect': (make_ect, {'name', 'distance', 'p_mean', 'p_std', 'q', 'stage_steps', 'weighting'}, set()),
    'sct': (functools.partial(make_scm, distill=False), continuous.SCT_KEYS, {'jvp_dtype'}),
    'scd': (functools.partial(make_scm, distill=True), continuous.SCD_KEYS, {'jvp_dtype'}),
    'ct_continuous': (functools.partial(make_cm_continuous, distill=False), continuous.CM_KEYS, {'weighting'}),
    'cd_continuous': (functools.partial(make_cm_continuous, distill=True), continuous.CM_KEYS, {'weighting'}),
    'lcd': (make_lcd, _LATENT, set()),
    'lcf': (make_lcf, _LATENT, set()),
    'flow_matching': (flow_matching.make_flow_matching, flow_matching.KEYS, set()),
    'meanflow': (meanflow.make_meanflow, meanflow.KEYS, set(meanflow.OPTIONAL)),
    'imeanflow': (imeanflow.make_imeanflow, imeanflow.KEYS, set(imeanflow.OPTIONAL)),
    'autoencoder': (make_autoencoder, {'name', 'kl_weight', 'lpips_weight', 'lpips_weights', 'reconstruction',
                                       'scale_records'}, set()),
}


def objective_keys(name: str) -> tuple[set, set]:
  """(the config.objective keys objective `name` reads, the optional ones)."""
  return set(_REGISTRY[name][1]), set(_REGISTRY[name][2])


def make_objective(config, model) -> Objective:
  """Builds the objective named by config.objective.name on the configured parameterisation.

  With config.lora.rank > 0 the objective trains low-rank adapters on its frozen teacher (objectives/lora.py).

  Raises:
    ValueError: on an unknown name or objective key, a missing key, or when the network has a guidance input (model.guidance_embedding) and the
      objective feeds no guidance scale, or the other way round.
  """
  name = config.objective.name
  if name not in _REGISTRY:
    raise ValueError(f'Unknown objective.name {name!r}; expected one of {sorted(_REGISTRY)}.')
  make, required, optional = _REGISTRY[name]
  check_keys(config.objective, required, optional)
  objective = make(config, model, make_parameterization(config))
  if takes_guidance(model) and not objective.feeds_guidance:
    raise ValueError(f'model.guidance_embedding=True but objective.name={name!r} feeds the network no guidance '
                     'scale: sCD with a range objective.guidance_scale=(lo, hi), lo < hi, and LCD / LCF do.')
  lo, hi = tuple(config.objective.get('guidance_scale', (1.0, 1.0)))
  if lo < hi and not takes_guidance(model):
    raise ValueError(f'objective.guidance_scale={(lo, hi)} samples a guidance scale per example, which a student '
                     'without a guidance input cannot see (it would learn the teacher at the mean scale, with more '
                     'noise): set model.guidance_embedding=True, or a fixed scale lo = hi.')
  return with_lora(objective, config, model)
