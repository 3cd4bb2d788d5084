"""Experiment trackers behind one small interface, and the images they receive.

A writer has write_scalars(step, {name: value}), write_images(step, {name: uint8 [H, W, C]}),
write_config(config) (the resolved config, for comparing runs), flush() and close(). `make_writers` builds the
run's: TensorBoard event files (tensorboardX) always, Weights & Biases when config.logging.wandb.mode is 'online' or
'offline' (the `wandb` extra). Only process 0 writes. Another tracker is one more class here.
BUILD_NOTES.md says why tensorboardX and not clu.metric_writers (which imports TensorFlow).
"""

import importlib.util
import netrc
import os
import pathlib
import urllib.parse
import uuid

from absl import logging
import flax
import jax
import numpy as np
from PIL import Image
from etils import epath

WANDB_MODES = ('off', 'online', 'offline')
WANDB_ID_FILE = 'wandb_run_id'
VIEWABLE_SIDE = 256  # sample grids smaller than this are enlarged to about it (`enlarge`)


def flat_config(config) -> dict:
  """The config as {'optim.learning_rate': 0.001, ...}, sequences as strings: what trackers take as hyperparameters."""
  flat = flax.traverse_util.flatten_dict(config.to_dict(), sep='.')
  return {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in flat.items()}


class TensorBoardWriter:
  """Scalars, images and the config (TensorBoard's HParams view) into event files under `logdir`."""

  def __init__(self, logdir):
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    self._writer = SummaryWriter(logdir=str(logdir), flush_secs=30)

  def write_scalars(self, step: int, scalars: dict):
    for name, value in scalars.items():
      self._writer.add_scalar(name, float(value), global_step=step)

  def write_images(self, step: int, images: dict):
    for name, image in images.items():
      self._writer.add_image(name, image, global_step=step, dataformats='HWC')

  def write_config(self, config):
    from tensorboardX.summary import hparams  # pylint: disable=g-import-not-at-top
    experiment, start, _ = hparams(flat_config(config), {'loss': None})
    self._writer.file_writer.add_summary(experiment)
    self._writer.file_writer.add_summary(start)

  def flush(self):
    self._writer.flush()

  def close(self):
    self._writer.close()


class WandbWriter:
  """A Weights & Biases run in `workdir`: its id is kept in WORKDIR/wandb_run_id, so a restarted (preempted) run
  continues the same W&B run."""

  def __init__(self, workdir, settings, name: str):
    import wandb  # pylint: disable=g-import-not-at-top
    self._wandb = wandb
    id_file = epath.Path(workdir) / WANDB_ID_FILE
    if not id_file.exists():
      id_file.write_text(uuid.uuid4().hex[:12])
    self._run = wandb.init(project=settings.project, entity=settings.entity or None, mode=settings.mode,
                           id=id_file.read_text().strip(), resume='allow', dir=str(workdir), name=name,
                           reinit='finish_previous', settings=wandb.Settings(silent=True, console='off'))

  def write_scalars(self, step: int, scalars: dict):
    self._run.log({k: float(v) for k, v in scalars.items()}, step=step)

  def write_images(self, step: int, images: dict):
    self._run.log({k: self._wandb.Image(v) for k, v in images.items()}, step=step)

  def write_config(self, config):
    self._run.config.update(flat_config(config), allow_val_change=True)

  def flush(self):
    pass

  def close(self):
    self._run.finish()


def check_logging_config(config) -> None:
  """Fails at start on an unknown tracker mode, or a tracker that is configured but not installed."""
  settings = config.get('logging', {}).get('wandb')
  if settings is None:
    return
  if settings.mode not in WANDB_MODES:
    raise ValueError(f'logging.wandb.mode={settings.mode!r}; expected one of {WANDB_MODES}.')
  if settings.mode != 'off':
    if not settings.project:
      raise ValueError('logging.wandb.project is empty: name the W&B project the run logs to.')
    if importlib.util.find_spec('wandb') is None:
      raise ValueError(f'logging.wandb.mode={settings.mode!r} needs the wandb package: pip install -e '
                       "'.[wandb]' (or pip install wandb).")
    if settings.mode == 'online' and not wandb_credentials_found(os.environ):
      raise ValueError("logging.wandb.mode='online' needs a W&B API key, and none is set: run `wandb login` (it "
                       'writes ~/.netrc) or set WANDB_API_KEY; or log offline with --config.logging.wandb.mode=offline '
                       'and upload later with `wandb sync WORKDIR/wandb`.')


def wandb_credentials_found(environ) -> bool:
  """Whether W&B can log in without asking: WANDB_API_KEY or WANDB_IDENTITY_TOKEN_FILE is set, or the netrc file
  (NETRC, else ~/.netrc or ~/_netrc) has an entry for the W&B host (WANDB_BASE_URL, default api.wandb.ai), as
  `wandb login` writes it. A netrc file that does not parse counts as found (W&B reads it leniently)."""
  if environ.get('WANDB_API_KEY') or environ.get('WANDB_IDENTITY_TOKEN_FILE'):
    return True
  host = urllib.parse.urlparse(environ.get('WANDB_BASE_URL') or 'https://api.wandb.ai').hostname
  home = pathlib.Path(environ.get('HOME') or pathlib.Path.home())
  files = [pathlib.Path(environ['NETRC'])] if environ.get('NETRC') else [home / '.netrc', home / '_netrc']
  for path in files:
    if path.is_file():
      try:
        return netrc.netrc(str(path)).authenticators(host) is not None
      except (netrc.NetrcParseError, OSError):
        return True
  return False


class Writers:
  """The run's trackers (process 0; elsewhere none): each call goes to every one; scalars are also logged."""

  def __init__(self, writers):
    self._writers = writers

  def write_scalars(self, step: int, scalars: dict):
    for w in self._writers:
      w.write_scalars(step, scalars)
    if self._writers:
      logging.info('[%d] %s', step, ', '.join(f'{k}={float(v):.5g}' for k, v in sorted(scalars.items())))

  def write_images(self, step: int, images: dict):
    for w in self._writers:
      w.write_images(step, images)

  def write_config(self, config):
    for w in self._writers:
      w.write_config(config)

  def flush(self):
    for w in self._writers:
      w.flush()

  def close(self):
    for w in self._writers:
      w.close()


def make_writers(config, workdir) -> Writers:
  """TensorBoard under WORKDIR/tensorboard, and W&B when config.logging.wandb.mode is not 'off' (process 0); the
  settings were checked with the config (check_logging_config)."""
  if jax.process_index() != 0:
    return Writers([])
  writers = [TensorBoardWriter(epath.Path(workdir) / 'tensorboard')]
  settings = config.get('logging', {}).get('wandb')
  if settings is not None and settings.mode != 'off':
    writers.append(WandbWriter(workdir, settings, epath.Path(workdir).name))
  return Writers(writers)


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


def enlarge(image: np.ndarray, side: int = VIEWABLE_SIDE) -> np.ndarray:
  """A uint8 [H, W, C] image enlarged by nearest neighbour (each pixel repeated k x k) with the largest integer k that
  keeps its longer side <= `side`; an image that long already is returned as it is."""
  k = max(1, side // max(image.shape[:2]))
  return np.repeat(np.repeat(image, k, axis=0), k, axis=1)


def samples_image(samples: np.ndarray) -> np.ndarray:
  """An image of a batch of samples: a grid for images (small ones enlarged to a viewable size: 8x8 digits in 8
  columns from 64 to 256 pixels), a scatter histogram for 2-D points."""
  return scatter_image(samples) if samples.ndim == 2 else enlarge(image_grid(samples))


def save_png(path, image: np.ndarray):
  """Writes a uint8 [H, W, C] array as PNG (process 0 only)."""
  if jax.process_index() != 0:
    return
  image = image[..., 0] if image.shape[-1] == 1 else image
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  with path.open('wb') as f:
    Image.fromarray(image).save(f, format='PNG')
