"""Registry: `config.objective.name` -> the method's Objective."""

from cm_jax.objectives.base import Objective, network
from cm_jax.objectives.diffusion import make_edm
from cm_jax.objectives.discrete import make_ict
from cm_jax.parameterization import make_parameterization

_REGISTRY = {'edm': make_edm, 'ict': make_ict}


def make_objective(config, model) -> Objective:
  """Builds the objective named by config.objective.name on the configured parameterisation."""
  name = config.objective.name
  if name not in _REGISTRY:
    raise ValueError(f'Unknown objective.name {name!r}; expected one of {sorted(_REGISTRY)}.')
  return _REGISTRY[name](config, model, make_parameterization(config))
