"""Images stored as files: `root/<split>/<class>/*.{png,jpg,jpeg}`.

`root` is a folder or a .tar.gz archive of one (possibly wrapped in a single
top-level folder). An archive is extracted once into a cache folder keyed by
its path, size and modification time, and reused by later runs.

Class folder names, sorted alphabetically, give the label ids. Files are
listed at build time and decoded per batch with PIL, always to RGB (grayscale
files get three equal channels). With a non-zero image_size every image is
resized (not cropped) to image_size x image_size with bicubic filtering;
otherwise all images must share the size of the first one.
"""

import hashlib
import os
import pathlib
import shutil
import tarfile
import tempfile

import numpy as np
from PIL import Image

from cm_jax.data import source

DEFAULT_CACHE_DIR = os.path.expanduser('~/.cache/cm_jax/image_folder')
IMAGE_SUFFIXES = ('.png', '.jpg', '.jpeg')


def extract_once(
    archive: pathlib.Path, cache_dir: pathlib.Path
) -> pathlib.Path:
  """Returns a folder with the archive's files, extracting it on first use."""
  stat = archive.stat()
  key = f'{archive.resolve()}:{stat.st_size}:{stat.st_mtime_ns}'
  digest = hashlib.sha256(key.encode()).hexdigest()[:16]
  target = cache_dir / f'{archive.name.removesuffix(".tar.gz")}-{digest}'
  if not target.is_dir():
    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(
        tempfile.mkdtemp(prefix='.extracting-', dir=cache_dir)
    )
    with tarfile.open(archive, 'r:gz') as tar:
      tar.extractall(staging, filter='data')
    try:
      staging.rename(target)
    except OSError:  # Another process finished the same extraction first.
      shutil.rmtree(staging)
  return target


def _split_dir(root: pathlib.Path, split: str) -> pathlib.Path:
  """Returns root/split, looking through a single wrapping top-level folder."""
  if not (root / split).is_dir():
    entries = list(root.iterdir())
    if len(entries) == 1 and entries[0].is_dir():
      root = entries[0]
  if not (root / split).is_dir():
    found = sorted(p.name for p in root.iterdir())
    raise ValueError(f'No split folder {split!r} in {root} (found: {found}).')
  return root / split


def list_images(
    split_dir: pathlib.Path,
) -> tuple[list[pathlib.Path], np.ndarray, list[str]]:
  """Returns image files, their int32 labels and the sorted class names."""
  classes = sorted(p.name for p in split_dir.iterdir() if p.is_dir())
  files, labels = [], []
  for label, name in enumerate(classes):
    class_files = sorted(
        p
        for p in (split_dir / name).iterdir()
        if p.suffix.lower() in IMAGE_SUFFIXES
    )
    files += class_files
    labels += [label] * len(class_files)
  if not files:
    raise ValueError(
        f'No {"/".join(IMAGE_SUFFIXES)} images in {split_dir}/<class>/.'
    )
  return files, np.array(labels, np.int32), classes


def _read_rgb(path: pathlib.Path, image_size: int) -> np.ndarray:
  """Decodes one file to uint8 RGB, resized to image_size when non-zero."""
  with Image.open(path) as image:
    image = image.convert('RGB')
    if image_size and image.size != (image_size, image_size):
      image = image.resize((image_size, image_size), Image.Resampling.BICUBIC)
    return np.asarray(image)


class ImageFolderSource:
  """A source over image files, decoded lazily per batch."""

  def __init__(
      self,
      files: list[pathlib.Path],
      labels: np.ndarray,
      num_classes: int,
      image_size: int,
  ):
    self._files = files
    self._labels = labels
    self._image_size = image_size
    self.num_classes = num_classes
    if image_size:
      self.shape = (image_size, image_size, 3)
    else:
      with Image.open(files[0]) as first:
        self.shape = (first.height, first.width, 3)

  def __len__(self) -> int:
    """Returns the number of image files."""
    return len(self._files)

  def get(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    """Decodes the images at `indices`, in that order."""
    images = [_read_rgb(self._files[i], self._image_size) for i in indices]
    for i, image in zip(indices, images):
      if image.shape != self.shape:
        raise ValueError(
            f'{self._files[i]} has shape {image.shape}, not {self.shape};'
            ' set image_size to resize all images to one size.'
        )
    return {
        'image': source.scale_uint8(np.stack(images)),
        'label': self._labels[indices],
    }


def image_folder_source(
    path: str, split: str, image_size: int, cache_dir: str
) -> ImageFolderSource:
  """Lists `split` of the image folder or .tar.gz at `path`.

  Args:
    path: the folder, or a .tar.gz archive of it.
    split: the split folder to read, e.g. 'train'.
    image_size: side of the square images to resize to; 0 keeps the size.
    cache_dir: where archives are extracted; '' means `DEFAULT_CACHE_DIR`.

  Returns:
    The source, with labels given by the sorted class folder names.
  """
  root = pathlib.Path(path).expanduser()
  if not path or not root.exists():
    raise ValueError(f'Image folder path {path!r} does not exist.')
  if root.is_file():
    if not root.name.endswith('.tar.gz'):
      raise ValueError(f'Image folder path {path!r} is a file but not .tar.gz.')
    root = extract_once(root, pathlib.Path(cache_dir or DEFAULT_CACHE_DIR))
  files, labels, classes = list_images(_split_dir(root, split))
  return ImageFolderSource(files, labels, len(classes), image_size)
