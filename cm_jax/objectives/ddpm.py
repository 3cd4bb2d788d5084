"""DDPM teachers on the discrete VP process of latent diffusion (parameterization.VP), sampled with DDIM.

Class-conditional with model.label_dropout > 0, one network learns the conditional and the unconditional (label -1)
predictions that classifier-free guidance combines (sampling.guidance_scale for DDIM; LCD's guided teacher).
"""

import jax
import jax.numpy as jnp

from cm_jax import distances
from cm_jax import sampling
from cm_jax.models.apply import network
from cm_jax.objectives.base import Objective, labels
from cm_jax.parameterization import VP


def make_ddpm(config, model, vp: VP) -> Objective:
  """E_{t ~ U{0..T-1}, eps ~ N(0, I)} mean_D (F(alpha_t x0 + sigma_t eps, t) - y)^2 with y = eps, v = alpha_t eps -
  sigma_t x0 or x0 (parameterization.prediction)."""
  if not isinstance(vp, VP):
    raise ValueError("objective.name='ddpm' needs parameterization.name='vp'.")

  def loss(params, extra, inputs, batch, rng, step):
    del extra, inputs, step
    x0 = batch['image']
    rng_t, rng_eps, rng_drop = jax.random.split(rng, 3)
    t = jax.random.randint(rng_t, (x0.shape[0],), 0, vp.num_timesteps)
    eps = jax.random.normal(rng_eps, x0.shape)
    net = network(model, params, labels(batch, config.model), rng_drop)
    loss = jnp.mean(distances.squared_l2(net(vp.noise(x0, eps, t), t.astype(jnp.float32)), vp.target(x0, eps, t)))
    return loss, {'loss': loss}

  return Objective(loss=loss, sampler=sampling.DDIM)
