"""The record-source interface shared by all data sets, and small helpers.

A source is a random-access collection of records. `get(indices)` returns a
batch `{'image': float32 [n, *shape], 'label': int32 [n]}` in the order of
`indices`. Images are scaled to [-1, 1]; 2-D toy sets put their points under
'image' as well, so that models and objectives see one format.
"""

import dataclasses
from typing import Protocol

import numpy as np


class Source(Protocol):
  """Random access to the records of one split of a data set."""

  shape: tuple[int, ...]  # Per-sample shape: (H, W, C) or (2,).
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

  def __len__(self) -> int:
    """Returns the number of records."""
    return len(self.images)

  def get(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    """Returns the records at `indices`, in that order."""
    return {'image': self.images[indices], 'label': self.labels[indices]}


def scale_uint8(images: np.ndarray) -> np.ndarray:
  """Maps uint8 pixel values 0..255 to float32 in [-1, 1]."""
  return images.astype(np.float32) / 127.5 - 1.0


def check_stored_size(name: str, shape: tuple[int, ...], image_size: int):
  """Raises ValueError when `image_size` asks to resize a fixed-size set."""
  if image_size and tuple(shape[:2]) != (image_size, image_size):
    raise ValueError(
        f'Data set {name!r} stores {shape[0]}x{shape[1]} images and is not'
        f' resized; set image_size to 0 or {shape[0]} (got {image_size}).'
    )
