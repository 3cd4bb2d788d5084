"""Registry: `config.objective.name` -> the method's Objective."""

import functools

from cm_jax.objectives.base import Objective, network
from cm_jax.objectives.continuous import make_cm_continuous, make_scm
from cm_jax.objectives.diffusion import make_edm, make_trigflow_diffusion
from cm_jax.objectives.discrete import make_cd, make_ct, make_ict
from cm_jax.objectives.ect import make_ect
from cm_jax.parameterization import make_parameterization

_REGISTRY = {'edm': make_edm, 'ict': make_ict, 'cd': make_cd, 'ct': make_ct, 'ect': make_ect,
             'trigflow': make_trigflow_diffusion,
             'sct': functools.partial(make_scm, distill=False), 'scd': functools.partial(make_scm, distill=True),
             'ct_continuous': functools.partial(make_cm_continuous, distill=False),
             'cd_continuous': functools.partial(make_cm_continuous, distill=True)}


def make_objective(config, model) -> Objective:
  """Builds the objective named by config.objective.name on the configured parameterisation."""
  name = config.objective.name
  if name not in _REGISTRY:
    raise ValueError(f'Unknown objective.name {name!r}; expected one of {sorted(_REGISTRY)}.')
  return _REGISTRY[name](config, model, make_parameterization(config))
