"""Registry: `config.objective.name` -> the method's Objective."""

import functools

import ml_collections

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

# name -> (maker, the config.objective keys it needs, its optional keys with their defaults): every key an objective
# reads, declared once. objective_config puts the defaults into the configs (so --config.objective.KEY sets any of
# them) and make_objective into an older run's config; any other key is refused.
_DISCRETE_OPTIONAL = {'lpips_weights': '', 'distance_c': 0.0, 'c_schedule': 'fixed', 'diffusion_loss_weight': 0.0,
                      'diffusion_loss_fraction': 0.25, 'coupling': 'none', 'sinkhorn_epsilon': 0.05}
_LATENT = {'name', 'distance', 'distance_c', 'guidance_scale', 'skip', 'target_ema'}
_REGISTRY = {
    'edm': (make_edm, {'name', 'p_mean', 'p_std'}, {}),
    'trigflow': (make_trigflow_diffusion, {'name', 'p_mean', 'p_std'}, {'adaptive_weighting': False}),
    'ddpm': (make_ddpm, {'name'}, {}),
    'cd': (make_cd, {'name', 'distance', 'num_scales', 'solver', 'target_ema'}, _DISCRETE_OPTIONAL),
    'ct': (make_ct, {'name', 'distance', 's0', 's1', 'mu0', 'mu_convention'}, _DISCRETE_OPTIONAL),
    'ict': (make_ict, {'name', 'distance', 's0', 's1', 'p_mean', 'p_std'}, _DISCRETE_OPTIONAL),
    'ect': (make_ect, {'name', 'distance', 'p_mean', 'p_std', 'q', 'stage_steps', 'weighting'}, {}),
    'sct': (functools.partial(make_scm, distill=False), continuous.SCT_KEYS, {'jvp_dtype': 'float32'}),
    'scd': (functools.partial(make_scm, distill=True), continuous.SCD_KEYS, {'jvp_dtype': 'float32'}),
    'ct_continuous': (functools.partial(make_cm_continuous, distill=False), continuous.CM_KEYS, {'weighting': 'paper'}),
    'cd_continuous': (functools.partial(make_cm_continuous, distill=True), continuous.CM_KEYS, {'weighting': 'paper'}),
    'lcd': (make_lcd, _LATENT, {}),
    'lcf': (make_lcf, _LATENT, {}),
    'flow_matching': (flow_matching.make_flow_matching, flow_matching.KEYS, {}),
    'meanflow': (meanflow.make_meanflow, meanflow.KEYS, meanflow.OPTIONAL),
    'imeanflow': (imeanflow.make_imeanflow, imeanflow.KEYS, imeanflow.OPTIONAL),
    'autoencoder': (make_autoencoder, {'name', 'kl_weight', 'lpips_weight', 'lpips_weights', 'reconstruction',
                                       'scale_records'}, {}),
}


def objective_keys(name: str) -> tuple[set, dict]:
  """(the config.objective keys objective `name` needs, its optional ones with their defaults)."""
  if name not in _REGISTRY:
    raise ValueError(f'Unknown objective.name {name!r}; expected one of {sorted(_REGISTRY)}.')
  return set(_REGISTRY[name][1]), dict(_REGISTRY[name][2])


def objective_config(name: str, **values) -> ml_collections.ConfigDict:
  """config.objective of objective `name`: `values` (every key it needs) and each optional key it reads, at its
  default where not given, so that a command line can set any of them (--config.objective.KEY=VALUE)."""
  required, optional = objective_keys(name)
  config = ml_collections.ConfigDict(dict(optional, name=name, **values))
  check_keys(config, required, optional)
  return config


def with_defaults(objective_config) -> ml_collections.ConfigDict:
  """A copy of a config.objective with its objective's optional keys added at their defaults where absent (a run
  written before a key existed reads as its default)."""
  _, optional = objective_keys(objective_config.name)
  return ml_collections.ConfigDict(dict(optional, **objective_config.to_dict()))


def make_objective(config, model) -> Objective:
  """Builds the objective named by config.objective.name on the configured parameterisation.

  With config.lora.rank > 0 the objective trains low-rank adapters on its frozen teacher (objectives/lora.py).

  Raises:
    ValueError: on an unknown name or objective key, a missing key, or when the network has a guidance input (model.guidance_embedding) and the
      objective feeds no guidance scale, or the other way round.
  """
  name = config.objective.name
  required, optional = objective_keys(name)
  check_keys(config.objective, required, optional)
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.objective = with_defaults(config.objective)
  objective = _REGISTRY[name][0](config, model, make_parameterization(config))
  if takes_guidance(model) and not objective.feeds_guidance:
    raise ValueError(f'model.guidance_embedding=True but objective.name={name!r} feeds the network no guidance '
                     'scale: sCD with a range objective.guidance_scale=(lo, hi), lo < hi, and LCD / LCF do.')
  lo, hi = tuple(config.objective.get('guidance_scale', (1.0, 1.0)))
  if lo < hi and not takes_guidance(model):
    raise ValueError(f'objective.guidance_scale={(lo, hi)} samples a guidance scale per example, which a student '
                     'without a guidance input cannot see (it would learn the teacher at the mean scale, with more '
                     'noise): set model.guidance_embedding=True, or a fixed scale lo = hi.')
  return with_lora(objective, config, model)
