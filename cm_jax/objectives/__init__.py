"""Registry: `config.objective.name` -> the method's Objective."""

import functools

from cm_jax.models.apply import takes_guidance
from cm_jax.objectives.autoencoder import make_autoencoder
from cm_jax.objectives.base import Objective
from cm_jax.objectives.continuous import make_cm_continuous, make_scm
from cm_jax.objectives.ddpm import make_ddpm
from cm_jax.objectives.diffusion import make_edm, make_trigflow_diffusion
from cm_jax.objectives.discrete import make_cd, make_ct, make_ict
from cm_jax.objectives.ect import make_ect
from cm_jax.objectives.latent import make_lcd, make_lcf
from cm_jax.objectives.lora import with_lora
from cm_jax.parameterization import make_parameterization

_REGISTRY = {'edm': make_edm, 'ict': make_ict, 'cd': make_cd, 'ct': make_ct, 'ect': make_ect,
             'trigflow': make_trigflow_diffusion,
             'sct': functools.partial(make_scm, distill=False), 'scd': functools.partial(make_scm, distill=True),
             'ct_continuous': functools.partial(make_cm_continuous, distill=False),
             'cd_continuous': functools.partial(make_cm_continuous, distill=True),
             'ddpm': make_ddpm, 'lcd': make_lcd, 'lcf': make_lcf, 'autoencoder': make_autoencoder}


def make_objective(config, model) -> Objective:
  """Builds the objective named by config.objective.name on the configured parameterisation.

  With config.lora.rank > 0 the objective trains low-rank adapters on its frozen teacher (objectives/lora.py).

  Raises:
    ValueError: on an unknown name, or when the network has a guidance input (model.guidance_embedding) and the
      objective feeds no guidance scale, or the other way round.
  """
  name = config.objective.name
  if name not in _REGISTRY:
    raise ValueError(f'Unknown objective.name {name!r}; expected one of {sorted(_REGISTRY)}.')
  objective = _REGISTRY[name](config, model, make_parameterization(config))
  if takes_guidance(model) and not objective.feeds_guidance:
    raise ValueError(f'model.guidance_embedding=True but objective.name={name!r} feeds the network no guidance '
                     'scale: sCD with a range objective.guidance_scale=(lo, hi), lo < hi, and LCD / LCF do.')
  lo, hi = tuple(config.objective.get('guidance_scale', (1.0, 1.0)))
  if lo < hi and not takes_guidance(model):
    raise ValueError(f'objective.guidance_scale={(lo, hi)} samples a guidance scale per example, which a student '
                     'without a guidance input cannot see (it would learn the teacher at the mean scale, with more '
                     'noise): set model.guidance_embedding=True, or a fixed scale lo = hi.')
  return with_lora(objective, config, model)
