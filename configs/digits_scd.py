"""Continuous-time consistency distillation (sCD, Lu and Song 2024) of the digits_trigflow teacher on the 8x8 digits.

Commands (the teacher first; sCD starts from its EMA parameters and distils it):
  python -m cm_jax.main --config=configs/digits_trigflow.py --workdir=runs/digits_trigflow
  python -m cm_jax.main --config=configs/digits_scd.py --workdir=runs/digits_scd \
      --config.teacher.workdir=runs/digits_trigflow
Hardware: 2 CPU cores, minutes (not yet measured; BUILD_NOTES.md).
Expected: a digits-proxy table with the teacher at 35 NFE and sCD at 1 and 2 steps; not yet measured.
An EDM teacher (configs/digits_edm.py with this network: positional 100 c_noise, double norm) is used with
--config.objective.teacher=edm, through x_sigma = x_t / cos(t), sigma = sd tan(t). No guidance (unconditional).

Guided variant `:guided` (classifier-free guidance distilled into a guidance-input student, sCM section 5):
  python -m cm_jax.main --config=configs/digits_trigflow.py:cond --workdir=runs/digits_trigflow_cond
  python -m cm_jax.main --config=configs/digits_scd.py:guided --workdir=runs/digits_scd_guided \
      --config.teacher.workdir=runs/digits_trigflow_cond
dx_t/dt = v(c) + (s - 1)(v(c) - v(null)) with s ~ U[1, 3] per example, fed to the student
(model.guidance_embedding, zero-initialised: the student starts as the teacher); samples use
sampling.guidance_scale = 2 (any s in the trained range, e.g. --config.sampling.guidance_scale=1.5).
"""

from cm_jax.objectives import objective_config
from configs import digits_trigflow

VARIANTS = ('', 'guided')


def get_config(arg=''):
  if arg not in VARIANTS:
    raise ValueError(f'Unknown digits_scd variant {arg!r}; expected one of {VARIANTS}.')
  guided = arg == 'guided'
  c = digits_trigflow.get_config('cond' if guided else '')
  c.objective = objective_config(
      name='scd', teacher='trigflow', guidance_scale=(1.0, 3.0) if guided else (1.0, 1.0), p_mean=-1.0, p_std=1.4,
      tangent_warmup_steps=1000, tangent_norm='l2', tangent_norm_c=0.1, adaptive_weighting=True, prior_weighting=True,
      jvp='jvp', fd_eps=1e-3)
  c.teacher.init = True
  c.model.guidance_embedding = guided
  c.sampling.guidance_scale = 2.0 if guided else 1.0
  c.model.dropout = 0.0
  c.train.num_steps = 4000
  c.optim.learning_rate = 2e-4
  c.optim.b2 = 0.99
  c.ema.rates = (0.999,)
  return c
