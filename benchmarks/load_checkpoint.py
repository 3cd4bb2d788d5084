"""Host memory and time of loading a released 296M-parameter ADM checkpoint (the CM paper's ImageNet-64 UNet in its
torch.save .pt format) onto a mesh: the peak resident set above the process's before the load, as a ratio to the
file's size (aim: <= 1.5), and the seconds from the file to parameters sharded on the devices.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \\
    python benchmarks/load_checkpoint.py --path=/tmp/cm_jax_bench/cd_imagenet64_random.pt

A missing --path is first written with random weights by the PyTorch reference UNet of tests/test_checkpoints.py
(needs torch; in its own process, so that its memory is not counted). The parameters are placed by
load_cm (shardings=) with the rules of configs/imagenet64_cm_release.py on a mesh of fsdp = all devices (kernels split
over the devices, the rest replicated), as --mode=fid on that mesh places them.
"""

import argparse
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, 'tests')]


def _rss_mib() -> float:
  """The resident set now (/proc/self/statm), MiB."""
  with open('/proc/self/statm') as f:
    return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 2**20


def write(path: str) -> None:
  """A random CM-paper ImageNet-64 UNet state dict at `path` (torch.save), from the reference of the tests."""
  import torch  # pylint: disable=g-import-not-at-top
  import test_checkpoints as tc  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  net = tc.GDUNet(64, channels=192, num_res_blocks=3, attention_resolutions=(32, 16, 8), channel_mult=(1, 2, 3, 4),
                  num_classes=1000, head_channels=64, scale_shift=True, resblock_updown=True)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  torch.save(net.state_dict(), path)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--path', default='/tmp/cm_jax_bench/cd_imagenet64_random.pt')
  parser.add_argument('--write_only', action='store_true', help='write the random checkpoint and stop')
  parser.add_argument('--stream', type=int, default=1,
                      help='1: each tensor read, converted and placed in turn (load_cm shardings=); 0: the whole '
                      'state dict read to numpy first, then placed')
  args = parser.parse_args()
  if args.write_only:
    return write(args.path)
  if not os.path.exists(args.path):
    subprocess.run([sys.executable, os.path.abspath(__file__), f'--path={args.path}', '--write_only'], check=True)
  import jax  # pylint: disable=g-import-not-at-top
  from cm_jax import releases  # pylint: disable=g-import-not-at-top
  from cm_jax import sharding  # pylint: disable=g-import-not-at-top
  from cm_jax import models  # pylint: disable=g-import-not-at-top
  from configs import imagenet64_cm_release  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  config = imagenet64_cm_release.get_config('cd_lpips')
  config.mesh.shape.data, config.mesh.shape.fsdp = 1, jax.device_count()
  mesh = sharding.make_mesh(config.mesh)
  model = models.build_model(config.model)
  abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)), jnp.zeros((1,)),
                            jnp.zeros((1,), jnp.int32))['params']
  shardings = sharding.tree_shardings(abstract, mesh, tuple(config.mesh.rules), config.mesh.min_size)
  size = os.path.getsize(args.path) / 2**20
  before, peak_before = _rss_mib(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
  start = time.perf_counter()
  params = releases.read('init.checkpoint', args.path, config, 64, shardings if args.stream else None).params
  read = time.perf_counter() - start
  params = jax.device_put(params, shardings)
  jax.block_until_ready(params)
  total = time.perf_counter() - start
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
  count = sum(x.size for x in jax.tree.leaves(params))
  print(f'{count / 1e6:.1f}M parameters, file {size:.0f} MiB, {jax.device_count()} devices ({mesh.shape}); '
        f'read {read:.1f} s, on the mesh after {total:.1f} s; resident before {before:.0f} MiB (peak so far '
        f'{peak_before:.0f}), peak {peak:.0f} MiB: {peak - before:.0f} MiB above, {(peak - before) / size:.2f}x the '
        'file')


if __name__ == '__main__':
  main()
