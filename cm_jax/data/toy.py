"""2-D toy distributions, generated in memory at build time.

All three live at roughly unit scale, inside the square [-1.5, 1.5]^2:

* `gmm`: equal-weight mixture of 8 isotropic Gaussians (std `GMM_STD` = 0.05)
  whose means sit evenly on the unit circle. Label: the component, 0..7.
* `checkerboard`: uniform on the 8 dark cells of a 4x4 board covering
  [-1, 1]^2 (cell side 0.5). Unlabelled (label 0).
* `rings`: two concentric circles of radius 0.5 and 1.0, chosen with equal
  probability, plus isotropic Gaussian noise of std `RINGS_STD` = 0.02.
  Label: the ring, 0 (inner) or 1 (outer).
"""

import numpy as np

from cm_jax.data import source

GMM_COMPONENTS = 8
GMM_STD = 0.05
RINGS_RADII = (0.5, 1.0)
RINGS_STD = 0.02
CHECKERBOARD_CELLS = 4


def gmm_means() -> np.ndarray:
  """Returns the [GMM_COMPONENTS, 2] means, spread evenly on the unit circle."""
  angles = 2 * np.pi * np.arange(GMM_COMPONENTS) / GMM_COMPONENTS
  return np.stack([np.cos(angles), np.sin(angles)], axis=1)


def _gmm(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
  """Samples n points and their component ids from the Gaussian mixture."""
  labels = rng.integers(GMM_COMPONENTS, size=n)
  points = gmm_means()[labels] + GMM_STD * rng.standard_normal((n, 2))
  return points, labels


def _checkerboard(
    rng: np.random.Generator, n: int
) -> tuple[np.ndarray, np.ndarray]:
  """Samples n points uniformly from the dark cells of the checkerboard."""
  cells = CHECKERBOARD_CELLS
  row = rng.integers(cells, size=n)
  # In each row, the dark cells are the columns with (row + column) even.
  col = 2 * rng.integers(cells // 2, size=n) + row % 2
  cell_corner = np.stack([col, row], axis=1)
  unit_square = (cell_corner + rng.random((n, 2))) / cells
  return 2 * unit_square - 1, np.zeros(n, np.int64)


def _rings(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
  """Samples n noisy points on the concentric circles, with their ring ids."""
  labels = rng.integers(len(RINGS_RADII), size=n)
  angles = 2 * np.pi * rng.random(n)
  radii = np.asarray(RINGS_RADII)[labels]
  circle = radii[:, None] * np.stack([np.cos(angles), np.sin(angles)], axis=1)
  return circle + RINGS_STD * rng.standard_normal((n, 2)), labels


# name -> (sampler, number of classes)
_TOY_SETS = {
    'gmm': (_gmm, GMM_COMPONENTS),
    'checkerboard': (_checkerboard, 0),
    'rings': (_rings, len(RINGS_RADII)),
}
NAMES = tuple(_TOY_SETS)


def toy_source(name: str, num_records: int, seed: int) -> source.ArraySource:
  """Returns `num_records` points of toy set `name`, a pure function of seed."""
  sampler, num_classes = _TOY_SETS[name]
  points, labels = sampler(np.random.default_rng(seed), num_records)
  return source.ArraySource(
      images=points.astype(np.float32),
      labels=labels.astype(np.int32),
      num_classes=num_classes,
  )
