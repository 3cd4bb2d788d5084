"""Per-device bytes of the train state, replicated vs fully sharded (FSDP), on 8 simulated CPU devices.

  python benchmarks/memory.py [--config=configs/cifar10_ict.py] [--allocate] [--config.mesh.min_size=...]

The config's train state (CIFAR-10 iCT by default: NCSN++ parameters + Adam moments + one sampling EMA;
iCT keeps no target copy) is laid out by the config's partition rules on the mesh {data: 8, fsdp: 1}
(replicated) and {data: 1, fsdp: 8} (FSDP). Sizes come from each leaf's shard shape under
`jax.eval_shape`, so nothing is allocated; with --allocate the FSDP state is also created and the bytes on
device 0 are counted as a check (slow on a CPU: it compiles the initialiser). The last line is
`fsdp_over_replicated=<x.xx>`: a little over 1/8, since leaves under mesh.min_size elements (biases, norms,
the first and last convolutions) stay replicated.

CIFAR-10 itself is not read: a temporary folder of eight random 32x32 RGB images stands in for it, giving
the network its input shape.
"""

import os

os.environ['XLA_FLAGS'] = os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8'
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import pathlib  # pylint: disable=g-import-not-at-top,wrong-import-position
import tempfile

from absl import app
from absl import flags
import jax
import ml_collections
from ml_collections import config_flags
import numpy as np
from PIL import Image

from cm_jax import experiment

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/cifar10_ict.py', 'Experiment whose state to lay out.')
_ALLOCATE = flags.DEFINE_bool('allocate', False, 'Also create the FSDP state and count the bytes on device 0.')
PARTS = ('params', 'opt_state', 'ema', 'target')


def on_mesh(image_folder: str, data: int, fsdp: int) -> ml_collections.ConfigDict:
  """--config reading `image_folder`, on a mesh {data, fsdp} of 8 devices."""
  c = ml_collections.ConfigDict(_CONFIG.value.to_dict())
  c.data.name, c.data.path, c.data.image_size, c.train.batch_size = 'image_folder', image_folder, 0, 8
  c.teacher.workdir = c.teacher.checkpoint = ''  # the state's layout reads no teacher
  c.mesh.shape = dict(data=data, fsdp=fsdp)
  return c


def write_image_folder(root: pathlib.Path) -> None:
  """Eight random 32x32 RGB PNGs in root/train/0: CIFAR-10's image shape, nothing more."""
  (root / 'train' / '0').mkdir(parents=True)
  rng = np.random.default_rng(0)
  for i in range(8):
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), np.uint8)).save(root / 'train' / '0' / f'{i}.png')


def bytes_per_device(exp: experiment.Experiment) -> dict[str, int]:
  """Bytes one device holds of each part of the abstract sharded train state."""
  def size(leaf):
    return int(np.prod(leaf.sharding.shard_shape(leaf.shape))) * leaf.dtype.itemsize
  return {part: sum(size(l) for l in jax.tree.leaves(getattr(exp.abstract_state, part))) for part in PARTS}


def bytes_on_device_0(state) -> int:
  """Bytes of the created state's parts that device 0 holds."""
  device = jax.devices()[0]
  return sum(shard.data.nbytes for part in PARTS for leaf in jax.tree.leaves(getattr(state, part))
             for shard in leaf.addressable_shards if shard.device == device)


def main(argv):
  del argv
  with tempfile.TemporaryDirectory() as folder:
    write_image_folder(pathlib.Path(folder))
    layouts = {'replicated': experiment.Experiment(on_mesh(folder, data=8, fsdp=1)),
               'fsdp': experiment.Experiment(on_mesh(folder, data=1, fsdp=8))}
    exp = layouts['fsdp']
    num_params = sum(l.size for l in jax.tree.leaves(exp.abstract_state.params))
    print(f'network: {exp.config.model.name}, {num_params / 1e6:.1f}M parameters; objective: '
          f'{exp.config.objective.name}; state: parameters, optimiser state, {len(exp.config.ema.rates)} EMA, '
          f'{"no target" if exp.abstract_state.target is None else "a target copy"}; 8 devices')
    totals = {}
    for name, layout in layouts.items():
      parts = bytes_per_device(layout)
      totals[name] = sum(parts.values())
      print(f'{name:>10} {dict(layout.mesh.shape)}: '
            + '  '.join(f'{p} {b / 2**20:.1f} MiB' for p, b in parts.items() if b)
            + f'  = {totals[name] / 2**20:.1f} MiB per device')
    if _ALLOCATE.value:
      created = bytes_on_device_0(exp.init_state())
      print(f'fsdp state created: {created / 2**20:.1f} MiB on device 0')
      assert created == totals['fsdp'], (created, totals['fsdp'])
  print(f'fsdp_over_replicated={totals["fsdp"] / totals["replicated"]:.2f}')


if __name__ == '__main__':
  app.run(main)
