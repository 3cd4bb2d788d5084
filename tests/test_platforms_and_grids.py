"""What a run shows (issue 24, item 3): JAX starts without asking libtpu for TPUs on a host that has none
(console.host_platforms; libtpu is not installed here, so its presence is simulated), and small sample grids are
enlarged by nearest neighbour to a viewable size (writers.enlarge, writers.samples_image)."""

import fnmatch

import numpy as np
import pytest

from cm_jax import console
from cm_jax import writers


def _host(devices=(), libtpu=True):
  """glob and find_spec of a host with these device files, with or without libtpu installed."""
  glob = lambda pattern: [d for d in devices if fnmatch.fnmatch(d, pattern)]
  find_spec = lambda name: object() if name == 'libtpu' and libtpu else None
  return glob, find_spec


@pytest.mark.parametrize('environ, devices, libtpu, plugins, expected', [
    ({}, (), True, [], 'cpu'),  # libtpu on a CPU workstation: the host's CPU only
    ({}, ('/dev/nvidia0', '/dev/nvidiactl'), True, ['jax_plugins.xla_cuda12'], 'cuda,cpu'),  # a GPU, JAX's plugin
    ({}, ('/dev/nvidiactl',), True, ['jax_plugins.xla_cuda12'], 'cpu'),  # the CUDA plugin but no GPU
    ({}, ('/dev/nvidia0',), True, [], 'cpu'),  # a GPU without JAX's plugin
    ({}, ('/dev/kfd',), True, ['xla_rocm60'], 'rocm,cpu'),
    ({}, ('/dev/accel0', '/dev/accel1'), True, [], None),  # a TPU VM (v4): JAX's own choice, the TPU
    ({}, ('/dev/vfio',), True, [], None),  # a TPU VM (v5e and later)
    ({}, (), False, ['jax_plugins.xla_cuda12'], None),  # no libtpu: nothing to silence
    ({'JAX_PLATFORMS': 'tpu'}, (), True, [], None),  # the user's choice stands
    ({'JAX_PLATFORMS': ''}, (), True, [], None),
])
def test_platforms_of_the_host(environ, devices, libtpu, plugins, expected):
  glob, find_spec = _host(devices, libtpu)
  assert console.host_platforms(environ, glob, find_spec, plugins) == expected


def test_the_selection_reaches_jax(monkeypatch):
  updates = []
  monkeypatch.setattr(console, 'host_platforms', lambda environ: 'cpu')
  monkeypatch.setattr(console.jax.config, 'update', lambda name, value: updates.append((name, value)))
  console.select_platforms()
  monkeypatch.setattr(console, 'host_platforms', lambda environ: None)
  console.select_platforms()
  assert updates == [('jax_platforms', 'cpu')]


def test_small_grids_are_enlarged_by_pixel_replication():
  """8x8 digits in 8 columns: a 64x64 grid, each pixel repeated 4 x 4 to 256x256; a 256x256 grid stays."""
  rng = np.random.default_rng(0)
  samples = rng.uniform(-1.0, 1.0, (16, 8, 8, 1)).astype(np.float32)
  grid = writers.image_grid(samples)
  assert grid.shape == (16, 64, 1)
  image = writers.samples_image(samples)
  assert image.shape == (64, 256, 1) and image.dtype == np.uint8
  for i in range(4):
    for j in range(4):
      np.testing.assert_array_equal(image[i::4, j::4], grid)
  np.testing.assert_array_equal(image[5, 9], grid[1, 2])  # pixel (5, 9) lies in the block of grid pixel (1, 2)
  big = rng.uniform(-1.0, 1.0, (64, 32, 32, 3)).astype(np.float32)
  np.testing.assert_array_equal(writers.samples_image(big), writers.image_grid(big))  # 256x256: as it is
  odd = np.arange(2 * 100 * 3, dtype=np.uint8).reshape(2, 100, 3)
  assert writers.enlarge(odd).shape == (4, 200, 3)  # 256 // 100 = 2
  points = rng.standard_normal((50, 2))
  assert writers.samples_image(points).shape == (256, 256, 1)  # 2-D points: the scatter image
