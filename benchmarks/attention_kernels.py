"""The attention kernels (models/attention.py) compiled for one TPU chip: XLA's estimates per kernel and derivative.

  python benchmarks/attention_kernels.py [--topology=v5p:2x2x1] [--lengths=1024,256] [--batch=32] [--heads=6]
      [--head_dim=64] [--dtype=bfloat16]

Needs libtpu (pip install -e '.[tpu]'); compiles, runs nothing. For each sequence length and kernel ('xla',
'flash') it compiles, on one chip of the topology, the attention of a [batch, length, heads, head_dim] input
alone ('fwd'), its gradient with respect to q, k and v ('fwdbwd', what training differentiates) and its JVP in all
three ('jvp', what sCM's tangent takes; 'flash' runs the forward-mode kernel there), and prints XLA's FLOPs, bytes
accessed, estimated time and temporary bytes. The defaults are ADM's 32x32 attention at ImageNet-64 sCT's 32 images
per chip. The Pallas kernels run here below attention.FLASH_MIN_LENGTH too, to show why they stop there; a length
that is not a multiple of 128 stays on XLA (ratio 1). The last line,
`attention: <L>_<derivative>=<xla est / flash est> ...`, holds the ratios (above 1: flash is faster).
FLOPs of Pallas kernels are what their cost estimates state: the flash backward kernels state none.
"""

import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp

from cm_jax import preflight
from cm_jax.models import attention

_TOPOLOGY = flags.DEFINE_string('topology', 'v5p:2x2x1', 'A TPU topology; one chip of it is used.')
_LENGTHS = flags.DEFINE_list('lengths', ['1024', '256'], 'Sequence lengths (H * W of the attention layer).')
_BATCH = flags.DEFINE_integer('batch', 32, 'Images per chip.')
_HEADS = flags.DEFINE_integer('heads', 6, 'Attention heads.')
_HEAD_DIM = flags.DEFINE_integer('head_dim', 64, 'Channels per head.')
_DTYPE = flags.DEFINE_string('dtype', 'bfloat16', 'Compute dtype of q, k, v.')


def _programs(kernel: str) -> dict:
  jvp_kernel = attention.FORWARD_MODE.get(kernel, kernel)
  square = lambda q, k, v: jnp.sum(attention.attention(q, k, v, kernel=kernel).astype(jnp.float32) ** 2)
  return {'fwd': lambda q, k, v: attention.attention(q, k, v, kernel=kernel),
          'fwdbwd': jax.grad(square, argnums=(0, 1, 2)),
          'jvp': lambda q, k, v: jax.jvp(lambda *a: attention.attention(*a, kernel=jvp_kernel), (q, k, v),
                                         (v, q, k))}  # tangents other than the primals: no shared products


def main(argv):
  del argv
  topo = preflight.topology(_TOPOLOGY.value)
  mesh = jax.sharding.Mesh(topo.devices[:1], ('chip',))
  where = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  estimates = {}
  for length in map(int, _LENGTHS.value):
    attention.FLASH_MIN_LENGTH = {k: min(v, length) for k, v in attention.FLASH_MIN_LENGTH.items()}
    spec = jax.ShapeDtypeStruct((_BATCH.value, length, _HEADS.value, _HEAD_DIM.value), jnp.dtype(_DTYPE.value),
                                sharding=where)
    for kernel in attention.KERNELS:
      for derivative, fn in _programs(kernel).items():
        start = time.perf_counter()
        compiled = jax.jit(fn).lower(spec, spec, spec).compile()
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        seconds = cost.get('optimal_seconds', float('nan'))
        estimates[length, kernel, derivative] = seconds
        print(f'L={length} {kernel} {derivative}: {cost.get("flops", 0) / 1e9:.1f} GFLOP, '
              f'{cost.get("bytes accessed", 0) / 2**20:.0f} MiB accessed, est. {seconds * 1e3:.3f} ms, temporaries '
              f'{compiled.memory_analysis().temp_size_in_bytes / 2**20:.0f} MiB (compiled in '
              f'{time.perf_counter() - start:.1f} s)', flush=True)
  ratios = ' '.join(f'{length}_{d}={estimates[length, "xla", d] / estimates[length, "flash", d]:.2f}'
                    for length in map(int, _LENGTHS.value) for d in ('fwd', 'fwdbwd', 'jvp'))
  print(f'attention: {ratios}')


if __name__ == '__main__':
  app.run(main)
