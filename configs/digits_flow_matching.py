"""Flow-matching teacher (z_t = (1 - t) x + t e, v-prediction, logit-normal t) on the built-in 8x8 digits: the
teacher row of the MeanFlow digits experiments, on digits_edm's MLP, data, batch and schedule.

Command:
  python -m cm_jax.main --config=configs/digits_flow_matching.py --workdir=runs/digits_flow_matching
Hardware: 2 CPU cores, 1-6 minutes (6000 steps at 20-95 steps/s, as the machine is shared).
Expected (measured, BUILD_NOTES.md): digits-proxy Frechet distance 4.2 at 18 NFE (sampling.teacher_steps = 18 Euler
steps; sampling.flow_solver='heun' gives 36 NFE); 3.2 with digits_edm's Fourier time embedding.
Time distribution: logit-normal (P_mean, P_std) = (-0.4, 1.0), MeanFlow's ImageNet setting (SiT / SD3 use (0, 1)).
Time embedding: sinusoids of t itself (positional, time_scale 1), as the official MeanFlow DiT embeds t and t - r
(Gsunshine/meanflow models/models_dit.py TimestepEmbedder on t in [0, 1]), not digits_edm's Fourier features of
scale 16: MeanFlow's du/dt differentiates the embedding, and those frequencies (~100 per unit t) made du/dt 8-11x the
velocity and the 1-NFE samples noise (BUILD_NOTES.md). MeanFlow and iMF on digits use this network with
model.second_time, so the teacher row is the same network.
"""

import ml_collections

from cm_jax.objectives import objective_config
from configs import digits_edm


def get_config():
  c = digits_edm.get_config()
  c.parameterization = ml_collections.ConfigDict(dict(name='flow_matching'))
  c.objective = objective_config(name='flow_matching', p_mean=-0.4, p_std=1.0)
  c.model.time_embedding = 'positional'
  c.model.time_scale = 1.0
  return c
