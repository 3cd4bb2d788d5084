"""Metric and image writing (TensorBoard event files via tensorboardX) and progress reporting.

Only process 0 writes; on other processes the writer is a no-op. See BUILD_NOTES.md for why tensorboardX
and not clu.metric_writers (which imports TensorFlow).
"""

import time

from absl import logging
import jax
import numpy as np
from PIL import Image
from etils import epath


class MetricWriter:
  """Scalars and images into TensorBoard event files under `logdir`, on process 0 only."""

  def __init__(self, logdir):
    self._writer = None
    if jax.process_index() == 0:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._writer = SummaryWriter(logdir=str(logdir), flush_secs=30)

  def write_scalars(self, step: int, scalars: dict):
    if self._writer is None:
      return
    for name, value in scalars.items():
      self._writer.add_scalar(name, float(value), global_step=step)
    logging.info('[%d] %s', step, ', '.join(f'{k}={float(v):.5g}' for k, v in sorted(scalars.items())))

  def write_images(self, step: int, images: dict):
    """images: name -> uint8 [H, W, C]."""
    if self._writer is None:
      return
    for name, image in images.items():
      self._writer.add_image(name, image, global_step=step, dataformats='HWC')

  def flush(self):
    if self._writer is not None:
      self._writer.flush()

  def close(self):
    if self._writer is not None:
      self._writer.close()


def image_grid(images: np.ndarray, columns: int = 8) -> np.ndarray:
  """Tiles float images in [-1, 1] of shape [N, H, W, C] into one uint8 grid [rows H, columns W, C]."""
  images = np.asarray(images, np.float32)
  n, h, w, c = images.shape
  rows = -(-n // columns)
  padded = np.zeros((rows * columns, h, w, c), np.float32) - 1.0
  padded[:n] = images
  grid = padded.reshape(rows, columns, h, w, c).transpose(0, 2, 1, 3, 4).reshape(rows * h, columns * w, c)
  return np.clip(np.round((grid + 1.0) * 127.5), 0, 255).astype(np.uint8)


def scatter_image(points: np.ndarray, size: int = 256, extent: float = 4.0) -> np.ndarray:
  """Renders 2-D points as a uint8 [size, size, 1] histogram image over [-extent, extent]^2."""
  hist, _, _ = np.histogram2d(points[:, 1], points[:, 0], bins=size, range=[[-extent, extent]] * 2)
  hist = np.flipud(hist)
  return (255 * np.minimum(hist / max(hist.max(), 1.0) * 4.0, 1.0)).astype(np.uint8)[..., None]


def samples_image(samples: np.ndarray) -> np.ndarray:
  """An image of a batch of samples: a grid for images, a scatter histogram for 2-D points."""
  return scatter_image(samples) if samples.ndim == 2 else image_grid(samples)


def save_png(path, image: np.ndarray):
  """Writes a uint8 [H, W, C] array as PNG (process 0 only)."""
  if jax.process_index() != 0:
    return
  image = image[..., 0] if image.shape[-1] == 1 else image
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  with path.open('wb') as f:
    Image.fromarray(image).save(f, format='PNG')


class Progress:
  """Logs steps/s and the ETA every `every_steps` steps."""

  def __init__(self, total_steps: int, every_steps: int, start_step: int = 0):
    self.total_steps, self.every_steps = total_steps, every_steps
    self._last_step, self._last_time = start_step, time.monotonic()

  def __call__(self, step: int, writer: MetricWriter):
    if step % self.every_steps and step != self.total_steps:
      return
    now = time.monotonic()
    rate = (step - self._last_step) / max(now - self._last_time, 1e-9)
    eta = (self.total_steps - step) / max(rate, 1e-9)
    self._last_step, self._last_time = step, now
    if jax.process_index() == 0:
      logging.info('step %d/%d  %.2f steps/s  ETA %s', step, self.total_steps, rate, _format_seconds(eta))
      print(f'step {step}/{self.total_steps}  {rate:.2f} steps/s  ETA {_format_seconds(eta)}', flush=True)
    writer.write_scalars(step, {'steps_per_sec': rate})


def _format_seconds(seconds: float) -> str:
  seconds = int(seconds)
  return f'{seconds // 3600}h{seconds % 3600 // 60:02d}m{seconds % 60:02d}s'
