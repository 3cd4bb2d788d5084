"""The record-source interface shared by all data sets, and small helpers.

A source is a random-access collection of records. `get(indices)` returns a
batch `{'image': [n, *shape], 'label': int32 [n]}` in the order of `indices`,
the images as stored: uint8 pixels 0..255 for image sets (a quarter of the
bytes of float32 between processes and onto the devices), float32 in [-1, 1]
for records held as floats (toy sets' 2-D points, digits, latent caches).
`to_model_range` maps either to the [-1, 1] floats models and objectives see,
on the host or inside a jitted step.
"""

import dataclasses
from typing import Protocol

import numpy as np


class Source(Protocol):
  """Random access to the records of one split of a data set."""

  shape: tuple[int, ...]  # Per-sample shape: (H, W, C) or (2,).
  dtype: np.dtype  # Of the images get() returns: uint8 or float32.
  num_classes: int  # 0 when unlabelled.

  def __len__(self) -> int:
    """Returns the number of records."""

  def get(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    """Returns the records at `indices`, in that order."""


@dataclasses.dataclass(frozen=True, eq=False)
class ArraySource:
  """A source whose records are held in memory (toy sets, digits)."""

  images: np.ndarray  # float32 [N, *shape]: images or 2-D points.
  labels: np.ndarray  # int32 [N]
  num_classes: int

  @property
  def shape(self) -> tuple[int, ...]:
    """Returns the per-sample shape."""
    return self.images.shape[1:]

  @property
  def dtype(self) -> np.dtype:
    """Returns the dtype of the stored images."""
    return self.images.dtype

  def __len__(self) -> int:
    """Returns the number of records."""
    return len(self.images)

  def get(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    """Returns the records at `indices`, in that order."""
    return {'image': self.images[indices], 'label': self.labels[indices]}


def to_model_range(images):
  """x / 127.5 - 1 (float32 in [-1, 1]) for uint8 pixels 0..255; float records unchanged. numpy or jax arrays."""
  if images.dtype == np.uint8:
    return images.astype(np.float32) / 127.5 - 1.0
  return images


def check_stored_size(name: str, shape: tuple[int, ...], image_size: int):
  """Raises ValueError when `image_size` asks to resize a fixed-size set."""
  if image_size and tuple(shape[:2]) != (image_size, image_size):
    raise ValueError(
        f'Data set {name!r} stores {shape[0]}x{shape[1]} images and is not'
        f' resized; set image_size to 0 or {shape[0]} (got {image_size}).'
    )
