"""Flow matching (Lipman et al. 2023; rectified flow, SiT) on z_t = (1 - t) x + t e: the v-prediction loss.

E_{t, x, e} ||v(z_t, t) - (e - x)||^2 / D with logit-normal t = sigmoid(n), n ~ N(P_mean, P_std^2); its minimiser is
the marginal velocity E[e - x | z_t], whose ODE dz/dt = v from z_1 = e ~ N(0, I) to t = 0 samples the data
(sampling.FLOW_ODE: Euler or Heun). It is also MeanFlow's r = t special case (objectives/meanflow.py).
"""

import jax
import jax.numpy as jnp

from cm_jax import distances
from cm_jax import sampling
from cm_jax.models.apply import network, takes_second_time
from cm_jax.objectives.base import Objective, labels
from cm_jax.parameterization import FlowMatching

KEYS = {'name', 'p_mean', 'p_std'}


def check_flow_matching(config, process, name: str) -> None:
  """The flow-matching process and a positive P_std, or a ValueError naming the key."""
  if not isinstance(process, FlowMatching):
    raise ValueError(f"objective.name={name!r} needs parameterization.name='flow_matching'.")
  if not config.objective.p_std > 0:
    raise ValueError(f'objective.p_std={config.objective.p_std} must be positive.')


def make_flow_matching(config, model, fm: FlowMatching) -> Objective:
  """E ||F(z_t, t) - (e - x)||^2 / D, t logit-normal; sampled with sampling.FLOW_ODE."""
  check_flow_matching(config, fm, 'flow_matching')
  if takes_second_time(model):
    raise ValueError("objective.name='flow_matching' trains a one-time velocity v(z_t, t): set "
                     "model.second_time=False (a two-time network is trained by objective.name='meanflow').")
  obj = config.objective

  def loss(params, extra, inputs, batch, rng, step):
    del extra, inputs, step
    x = batch['image']
    rng_t, rng_e, rng_drop = jax.random.split(rng, 3)
    t = fm.sample_t(rng_t, (x.shape[0],), obj.p_mean, obj.p_std)
    e = jax.random.normal(rng_e, x.shape)
    v_pred = fm.velocity(network(model, params, labels(batch, config.model), rng_drop), fm.noise(x, e, t), t)
    loss = jnp.mean(distances.squared_l2(v_pred, fm.target_velocity(x, e)))
    return loss, {'loss': loss}

  return Objective(loss=loss, sampler=sampling.FLOW_ODE)
