"""Low-rank adapters (LoRA, Hu et al. 2021) on the kernels of a frozen network, as LCM-LoRA trains them.

An adapted kernel W [..., d_out] (dense [d_in, d_out], conv [kh, kw, c_in, d_out]) gets the update
  W' = W + (alpha / r) A B,   A [..., r] (the kernel's fan-in shape, d_in = its product), B [r, d_out],
so a dense layer computes x W + (alpha / r) (x A) B and a conv layer conv(x, W) + (alpha / r) conv(x, A) B: r (d_in + d_out)
parameters per kernel. B starts at zero, so the adapted network starts as its base. Kernels are chosen by regexes
searched in their '/'-joined parameter paths ('block_0/dense_1/kernel'), as the mesh rules choose leaves.

Training runs the un-merged form (`apply_unmerged`: the base kernels stay as they are and each adapted layer adds its
low-rank branch); sampling and export merge (`merge`), and several adapters combine by a weighted sum of their
updates (LCM-LoRA's "acceleration vector" plus a style LoRA). cm_jax.formats.lora writes adapters of a diffusers
network as the LoRA file diffusers' load_lora_weights reads, and reads such files (PEFT, older diffusers, kohya keys).
"""

import re
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any


FORMS = ('merged', 'unmerged')  # lora.form: how a step applies the adapters (objectives/lora.py)


@flax.struct.dataclass
class LoRAParams:
  """A frozen base network, its adapters and their scale alpha / r: what a loss receives as `params` under LoRA;
  `merged`: applied as the merged kernels (`merge`) rather than in the un-merged form (`apply_unmerged`)."""
  base: PyTree
  adapters: PyTree
  scale: float = flax.struct.field(pytree_node=False)
  merged: bool = flax.struct.field(pytree_node=False, default=False)


def kernel_paths(params) -> list[str]:
  """The '/'-joined paths of every kernel (a leaf named 'kernel' with at least two dimensions)."""
  flat = flax.traverse_util.flatten_dict(params, sep='/')
  return sorted(p for p, v in flat.items() if p.split('/')[-1] == 'kernel' and np.ndim(v) >= 2)


def compile_rules(rules) -> list[re.Pattern]:
  """The regexes of lora.rules, compiled; an empty list or a rule that is not a regex is an error naming it."""
  if not rules:
    raise ValueError('lora.rules is empty; give at least one regex of kernel paths (e.g. "kernel$" for all).')
  patterns = []
  for rule in rules:
    try:
      patterns.append(re.compile(rule))
    except re.error as e:
      raise ValueError(f'lora.rules entry {rule!r} is not a regular expression ({e}); write it as a Python regex of '
                       'kernel paths, e.g. "up_blocks_.*/to_q/kernel$".') from e
  return patterns


def select(params, rules) -> list[str]:
  """The kernels matched by any of the regexes `rules`; a rule that matches none is an error listing the kernels."""
  kernels = kernel_paths(params)
  chosen = set()
  for rule in compile_rules(rules):
    matched = [k for k in kernels if rule.search(k)]
    if not matched:
      raise ValueError(f'lora.rules entry {rule.pattern!r} matches no kernel of the network; its kernels are: '
                       f'{kernels}.')
    chosen.update(matched)
  return sorted(chosen)


def init(rng, params, paths, rank: int):
  """Adapters {path...: {'a': A, 'b': B}} for the kernels at `paths`: A ~ N(0, 1 / d_in), B = 0."""
  if rank < 1:
    raise ValueError(f'lora.rank={rank} must be at least 1.')
  flat = flax.traverse_util.flatten_dict(params, sep='/')
  adapters = {}
  for i, path in enumerate(paths):
    shape = np.shape(flat[path])
    fan_in = int(np.prod(shape[:-1]))
    a = jax.random.normal(jax.random.fold_in(rng, i), shape[:-1] + (rank,)) / np.sqrt(fan_in)
    adapters[path + '/a'], adapters[path + '/b'] = a, jnp.zeros((rank, shape[-1]))
  return flax.traverse_util.unflatten_dict(adapters, sep='/')


def delta(adapter, scale: float):
  """The merged update scale A B of one kernel, with the kernel's shape."""
  return scale * jnp.einsum('...r,ro->...o', adapter['a'], adapter['b'])


def merge(base, *loras):
  """base with every adapted kernel W replaced by W + sum_i scale_i A_i B_i, for loras = (adapters_i, scale_i) pairs
  (scale_i = weight_i alpha_i / r_i)."""
  flat = dict(flax.traverse_util.flatten_dict(base, sep='/'))
  for adapters, scale in loras:
    for path, adapter in flax.traverse_util.flatten_dict(adapters, sep='/', is_leaf=_is_adapter).items():
      if path not in flat:
        raise ValueError(f'An adapter targets {path}, which the base network does not have.')
      flat[path] = flat[path] + delta(adapter, scale).astype(flat[path].dtype)
  return flax.traverse_util.unflatten_dict(flat, sep='/')


def _is_adapter(path, value) -> bool:
  del path
  return isinstance(value, dict) and set(value) == {'a', 'b'}


def apply_unmerged(model: nn.Module, params: LoRAParams, *args, **kwargs):
  """model.apply with the base parameters, each adapted Dense / Conv adding its branch scale (x A) B
  (conv: scale conv(x, A) B, A with the layer's window, strides and padding)."""
  adapters = flax.traverse_util.flatten_dict(params.adapters, sep='/', is_leaf=_is_adapter)
  in_branch = []  # set while the branch's own Conv runs: its path is empty too, and must not be adapted

  def interceptor(next_fun, call_args, call_kwargs, context):
    out = next_fun(*call_args, **call_kwargs)
    module = context.module
    if in_branch or context.method_name != '__call__' or not isinstance(module, (nn.Dense, nn.Conv)):
      return out
    adapter = adapters.get('/'.join((*module.path, 'kernel')))  # a top-level layer's path is empty: 'kernel'
    if adapter is None:
      return out
    x = call_args[0]
    a, b = (jnp.asarray(adapter[k], out.dtype) for k in ('a', 'b'))
    if isinstance(module, nn.Dense):
      low = jnp.dot(x.astype(out.dtype), a)
    else:
      in_branch.append(True)
      try:
        low = nn.Conv(a.shape[-1], module.kernel_size, strides=module.strides, padding=module.padding,
                      input_dilation=module.input_dilation, kernel_dilation=module.kernel_dilation, use_bias=False,
                      dtype=out.dtype, parent=None).apply({'params': {'kernel': a}}, x)
      finally:
        in_branch.pop()
    return out + params.scale * jnp.dot(low, b)

  with nn.intercept_methods(interceptor):
    return model.apply({'params': params.base}, *args, **kwargs)
