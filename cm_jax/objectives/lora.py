"""LoRA training of a distillation objective (LCM-LoRA, Luo et al. 2023): the teacher's network is the frozen base and
only low-rank adapters on its kernels train (models/lora.py); `config.lora.rank` > 0 switches it on for any objective
that distils a teacher.

The wrapped loss sees `lora.LoRAParams(teacher, adapters)` where it saw the network's parameters, so the student runs
with its adapters, merged into the kernels in the step (lora.form='merged': W + s A B formed once per call, cheapest
when the activations outnumber the kernels, as in a UNet on latents: LCM-LoRA's step then costs what LCD's does,
BUILD_NOTES) or un-merged (lora.form='unmerged': x W + s (x A) B per layer, no full-size kernel copy or gradient);
theta- is the same with the EMA adapters when the objective keeps a target. The train state,
its EMAs and checkpoints hold the adapters only; samples use the teacher merged with the EMA adapters.
"""

import dataclasses

import jax

from cm_jax.models import lora
from cm_jax.models.apply import takes_guidance
from cm_jax.objectives.base import Objective


def adapter_scale(lora_config) -> float:
  """The adapters' update scale alpha / r (W' = W + (alpha / r) A B)."""
  return lora_config.alpha / lora_config.rank


def with_lora(objective: Objective, config, model) -> Objective:
  """`objective` training rank-`lora.rank` adapters (scale lora.alpha / rank) on the kernels matched by lora.rules."""
  c = config.get('lora')
  if c is None or c.rank == 0:
    return objective
  if c.rank < 0 or c.alpha <= 0:
    raise ValueError(f'lora.rank={c.rank} must be >= 0 (0: off) and lora.alpha={c.alpha} positive.')
  if objective.distils is None:
    raise ValueError(f'lora.rank={c.rank} trains adapters on a frozen teacher, but objective.name='
                     f'{config.objective.name!r} distils none.')
  if config.teacher.init:
    raise ValueError('teacher.init=True with LoRA: the frozen base already is the teacher; set teacher.init=False.')
  if takes_guidance(model):
    raise ValueError('LoRA adapts the teacher\'s own network, which has no guidance input: set '
                     'model.guidance_embedding=False (LCM-LoRA has no w-embedding) and a fixed objective.guidance_scale.')
  form = c.get('form', 'unmerged')  # runs written before the key trained un-merged
  if form not in lora.FORMS:
    raise ValueError(f'lora.form={form!r}; expected one of {lora.FORMS}.')
  scale, rules, merged = adapter_scale(c), tuple(c.rules), form == 'merged'
  lora.compile_rules(rules)  # a rule that is no regex stops the run here, at the config


  def init_params(model_, rng, sample_input):
    base = jax.eval_shape(lambda: objective.init_params(model_, rng, sample_input))
    return lora.init(rng, base, lora.select(base, rules), c.rank)

  def loss(adapters, extra, inputs, batch, rng, step):
    base = inputs['teacher']
    if inputs.get('target') is not None:
      inputs = dict(inputs, target=lora.LoRAParams(base, inputs['target'], scale, merged))
    return objective.loss(lora.LoRAParams(base, adapters, scale, merged), extra, inputs, batch, rng, step)

  return dataclasses.replace(objective, loss=loss, init_params=init_params,
                             sample_params=lambda adapters, inputs: lora.merge(inputs['teacher'], (adapters, scale)))
