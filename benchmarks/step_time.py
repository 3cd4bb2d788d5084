"""Step time and peak memory of each objective against the diffusion (EDM) step on the same network and batch, in one run.

  python benchmarks/step_time.py [--config=configs/digits_ict.py] [--steps=10] [--rounds=5] [--batch_size=128] \
      [--unet_channels=0]
  python benchmarks/step_time.py --family=t2i [--batch_size=64]
  python benchmarks/step_time.py --family=flow [--unet_channels=0]

--family=t2i times the text-to-image steps of configs/digits_t2i_*.py on the digits pipeline's UNet2DConditionModel
(cross-attention on the frozen text tower, encoded in the step): DDPM, LCD (one student forward and backward, one
target forward, two teacher forwards for the guided target; goal <= 2.5x DDPM) and LCM-LoRA (goal <= LCD), ratios to
DDPM, the pipeline's UNet as the teacher.
--family=flow times flow matching, MeanFlow and improved MeanFlow (configs/digits_{flow_matching,meanflow,imeanflow}.py:
their objectives, on digits_meanflow's MLP, or with --unet_channels a UNet; two-time for MeanFlow and iMF): one
forward-mode jax.jvp per MeanFlow / iMF step (goal <= 1.3x the flow-matching step); ratios to flow_matching.

Every objective's step is compiled first; then the steps are timed in interleaved rounds (each round runs --steps
steps of every objective in turn), so a change of machine load during the run shifts all objectives alike. Prints,
per objective, the median step time and the compiled step's peak memory (XLA's memory analysis: arguments +
outputs + temporaries - aliased donations), and as the last line `ratios: ict=<x.xx> sct=<x.xx> scd=<x.xx> ...`:
the median over rounds of (objective's median step time in the round / diffusion's in the same round). An iCT step is one
forward and backward plus one forward without gradient (expect about 1.35 or less); sCT adds one forward-mode JVP
instead of the extra forward (goal: <= 1.5). TrigFlow objectives run on parameterization 'trigflow'; distillation
objectives get the initial parameters as their teacher.
"""

import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from ml_collections import config_flags

from cm_jax import experiment
from configs import digits_flow_matching, digits_imeanflow, digits_meanflow
from configs import digits_t2i_ddpm, digits_t2i_lcd, digits_t2i_lcm_lora

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/digits_ict.py', 'Network, data and batch to time.')
_STEPS = flags.DEFINE_integer('steps', 10, 'Timed steps per objective per round (after 3 warm-up steps).')
_BATCH = flags.DEFINE_integer('batch_size', 128, 'Global batch size.')

_SCM = dict(p_mean=-1.0, p_std=1.4, tangent_warmup_steps=10_000, tangent_norm='l2', tangent_norm_c=0.1,
            adaptive_weighting=True, prior_weighting=True, jvp='jvp', fd_eps=1e-3)
OBJECTIVES = {  # name -> (parameterization, objective config, distils a teacher)
    'edm': ('edm', dict(name='edm', p_mean=-1.2, p_std=1.2), False),
    'ict': ('edm', dict(name='ict', s0=10, s1=1280, p_mean=-1.1, p_std=2.0, distance='pseudo_huber'), False),
    'trigflow': ('trigflow', dict(name='trigflow', p_mean=-1.0, p_std=1.4), False),
    'sct': ('trigflow', dict(_SCM, name='sct'), False),
    'scd': ('trigflow', dict(_SCM, name='scd', teacher='trigflow', guidance_scale=(1.0, 1.0)), True),
    'sct_fd': ('trigflow', dict(_SCM, name='sct', jvp='finite_difference'), False),
    'ct_continuous': ('edm', dict(name='ct_continuous', jvp='jvp', fd_eps=1e-3), False),
    'cd_continuous': ('edm', dict(name='cd_continuous', jvp='jvp', fd_eps=1e-3), True),
}


_ROUNDS = flags.DEFINE_integer('rounds', 5, 'Interleaved timing rounds.')
_FAMILY = flags.DEFINE_enum('family', 'pixel', ['pixel', 't2i', 'flow'],
                            'pixel: OBJECTIVES on --config; t2i: T2I; flow: FLOW.')
_UNET = flags.DEFINE_integer('unet_channels', 0, 'If > 0, time a two-level UNet of this width (one block per level, '
                             'attention at 4x4) instead of the config\'s network.')


T2I = {'ddpm': digits_t2i_ddpm, 'lcd': digits_t2i_lcd, 'lcm_lora': digits_t2i_lcm_lora}
FLOW = {'flow_matching': digits_flow_matching, 'meanflow': digits_meanflow, 'imeanflow': digits_imeanflow}


class Timed:
  """One objective's compiled train step with its state, batch and teacher; `run(n)` gives n step times.

  teacher: 'initial' (the initial parameters: a distillation objective on --config), 'pipeline' (the pipeline's own
  UNet: the text-to-image family) or None."""

  def __init__(self, config, teacher=None):
    exp = experiment.Experiment(config)
    self.state, self.step_fn = exp.init_state(), exp.train_step()
    params = {'initial': lambda: jax.tree.map(jnp.copy, self.state.params),  # on device, not donated
              'pipeline': lambda: experiment.pipeline_teacher(config, exp).params, None: lambda: None}[teacher]()
    self.frozen = exp.frozen(params)
    with exp.batches(0) as batches:
      self.batch = next(batches)
    memory = self.step_fn.lower(self.state, self.batch, self.frozen).compile().memory_analysis()
    self.peak = (memory.argument_size_in_bytes + memory.output_size_in_bytes + memory.temp_size_in_bytes
                 - memory.alias_size_in_bytes)
    self.run(3)  # warm-up

  def run(self, num_steps: int) -> list[float]:
    times = []
    for _ in range(num_steps):
      start = time.perf_counter()
      self.state, metrics = self.step_fn(self.state, self.batch, self.frozen)
      jax.block_until_ready((self.state, metrics))
      times.append(time.perf_counter() - start)
    return times


def _timed_t2i() -> dict:
  timed = {}
  for name, module in T2I.items():
    config = module.get_config()
    config.teacher.workdir = ''
    config.train.batch_size = _BATCH.value
    timed[name] = Timed(config, 'pipeline' if name != 'ddpm' else None)
  return timed


def _timed_flow() -> dict:
  timed = {}
  model = digits_meanflow.get_config().model if not _UNET.value else _unet(_UNET.value)
  for name, module in FLOW.items():
    config = module.get_config()
    config.teacher.workdir = ''
    config.train.batch_size = _BATCH.value
    # One network for all three; flow matching's without the interval embedding it would not read.
    config.model = ml_collections.ConfigDict(dict(model.to_dict(), second_time=name != 'flow_matching'))
    timed[name] = Timed(config)
  return timed


def _unet(channels: int) -> ml_collections.ConfigDict:
  """A two-level UNet of `channels` (one block per level, attention at 4x4)."""
  return ml_collections.ConfigDict(dict(name='unet', channels=channels, channel_mult=(1, 2), num_res_blocks=1,
                                        attn_resolutions=(4,), num_classes=0))


def main(argv):
  del argv
  if _FAMILY.value == 't2i':
    report(_timed_t2i(), 'ddpm')
    return
  if _FAMILY.value == 'flow':
    report(_timed_flow(), 'flow_matching')
    return
  timed = {}
  for name, (parameterization, objective, distill) in OBJECTIVES.items():
    config = ml_collections.ConfigDict(_CONFIG.value.to_dict())
    config.parameterization.name = parameterization
    config.objective = ml_collections.ConfigDict(objective)
    config.train.batch_size = _BATCH.value
    if _UNET.value:
      config.model = _unet(_UNET.value)
    timed[name] = Timed(config, 'initial' if distill else None)
  report(timed, 'edm')


def report(timed: dict, base: str) -> None:
  """Times the steps in interleaved rounds; prints each median and the ratios to `base`'s step."""
  rounds = [{name: float(np.median(t.run(_STEPS.value))) for name, t in timed.items()} for _ in range(_ROUNDS.value)]
  for name, t in timed.items():
    median = np.median([r[name] for r in rounds])
    print(f'{name}: median step {median * 1e3:.2f} ms, peak memory {t.peak / 2**20:.1f} MiB', flush=True)
  ratios = {n: np.median([r[n] / r[base] for r in rounds]) for n in timed if n != base}
  print('ratios: ' + ' '.join(f'{n}={x:.2f}' for n, x in ratios.items()))


if __name__ == '__main__':
  app.run(main)
