"""Images stored as files: `root/<split>/<class>/*.{png,jpg,jpeg}`.

`root` is a folder or a .tar.gz archive of one (possibly wrapped in a single
top-level folder). An archive is extracted once into a cache folder keyed by
its path, size and modification time, and reused by later runs; it is
extracted into a temporary folder beside that one and renamed when complete,
so a truncated or garbage archive leaves nothing behind.

Class folder names, sorted alphabetically, give the label ids. Files are
listed at build time and their headers read (about 50 us a file), so a file
that is not an image, or an image of another size, is named before any
training; they are decoded per batch with PIL, always to RGB (grayscale files
get three equal channels), and a file that fails to decode then is named too.
With a non-zero image_size every image is resized (not cropped) to
image_size x image_size with bicubic filtering; otherwise all images must
share the size of the first one.
"""

import gzip
import hashlib
import os
import pathlib
import shutil
import tarfile
import tempfile
import zlib

import numpy as np
from PIL import Image
from PIL import UnidentifiedImageError

from cm_jax.data import source

DEFAULT_CACHE_DIR = os.path.expanduser('~/.cache/cm_jax/image_folder')
IMAGE_SUFFIXES = ('.png', '.jpg', '.jpeg')
# What reading a broken archive raises (gzip.BadGzipFile is an OSError).
_ARCHIVE_ERRORS = (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile)
# What PIL raises on a file it cannot identify or decode.
_IMAGE_ERRORS = (
    OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError
)


def _one_line(error: BaseException) -> str:
  return ' '.join(str(error).split()) or type(error).__name__


def extract_once(
    archive: pathlib.Path, cache_dir: pathlib.Path
) -> pathlib.Path:
  """Returns a folder with the archive's files, extracting it on first use.

  Raises:
    ValueError: when the archive is not a complete .tar.gz (nothing is left
      in `cache_dir`), or `cache_dir` cannot be written.
  """
  stat = archive.stat()
  key = f'{archive.resolve()}:{stat.st_size}:{stat.st_mtime_ns}'
  digest = hashlib.sha256(key.encode()).hexdigest()[:16]
  target = cache_dir / f'{archive.name.removesuffix(".tar.gz")}-{digest}'
  if target.is_dir():
    return target
  try:
    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(
        tempfile.mkdtemp(prefix='.extracting-', dir=cache_dir)
    )
  except OSError as e:
    raise ValueError(
        f'cannot extract {archive} into {cache_dir} ({_one_line(e)}): set'
        ' data.data_dir to a writable folder.'
    ) from e
  try:
    with tarfile.open(archive, 'r:gz') as tar:
      tar.extractall(staging, filter='data')
  except BaseException as e:
    shutil.rmtree(staging, ignore_errors=True)
    if isinstance(e, _ARCHIVE_ERRORS):
      raise ValueError(
          f'{archive} is not a complete .tar.gz archive ({_one_line(e)}):'
          ' replace it, or set data.path to the image folder itself.'
      ) from e
    raise
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


def _unreadable(path: pathlib.Path, error: BaseException) -> ValueError:
  # PIL's own message for an unknown format repeats the path.
  unknown = isinstance(error, UnidentifiedImageError)
  reason = 'PIL does not know its format' if unknown else _one_line(error)
  return ValueError(
      f'{path} is not a readable image ({reason}): remove or replace it.'
  )


def image_shape(files: list[pathlib.Path], image_size: int) -> tuple[int, ...]:
  """Returns the (H, W, 3) the images are read at, from every file's header.

  Raises:
    ValueError: naming the first file that is not an image, or (with
      image_size 0) whose size differs from the first one's.
  """
  shape = (image_size, image_size, 3) if image_size else None
  for path in files:
    try:
      with Image.open(path) as image:
        size = (image.height, image.width, 3)
    except _IMAGE_ERRORS as e:
      raise _unreadable(path, e) from e
    shape = shape or size
    if not image_size and size != shape:
      raise ValueError(
          f'{path} is {size[0]}x{size[1]}, not {shape[0]}x{shape[1]} like'
          f' {files[0]}; set image_size to resize all images to one size.'
      )
  return shape


def _read_rgb(path: pathlib.Path, image_size: int) -> np.ndarray:
  """Decodes one file to uint8 RGB, resized to image_size when non-zero."""
  try:
    with Image.open(path) as image:
      image = image.convert('RGB')
      if image_size and image.size != (image_size, image_size):
        image = image.resize(
            (image_size, image_size), Image.Resampling.BICUBIC
        )
      return np.asarray(image)
  except _IMAGE_ERRORS as e:
    raise _unreadable(path, e) from e


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
    self.shape = image_shape(files, image_size)
    self.dtype = np.dtype(np.uint8)

  def __len__(self) -> int:
    """Returns the number of image files."""
    return len(self._files)

  def get(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    """Decodes the images at `indices`, in that order (uint8)."""
    images = [_read_rgb(self._files[i], self._image_size) for i in indices]
    return {
        'image': np.stack(images),
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
