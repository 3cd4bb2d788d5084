"""Captioned images for text-to-image training: folders, webdataset shards, TFDS, digits.

Every source here is a `CaptionedSource`: a data/source.py Source whose
`get(indices)` returns, besides 'image' and 'label' (int32; the class where
the data set has one, else 0),

  'caption_ids': int32 [n, k, L], `tokenize(captions)` of the records'
    captions: the ids of the k tokenizers of a Stable Diffusion pipeline
    (k = 1 for SD 1/2, 2 for SDXL), L = 77, padded and truncated as
    diffusers does (`caption_tokenizer` makes such a function).

It is absent when the source was built with tokenize=None: such a source
still gives images, labels and `captions(indices)` (the strings, for FID or
CLIP prompts). Caption dropout is the train step's, not the source's.

Images are decoded to RGB, the shorter side resized to image_size and the
centre cropped to image_size x image_size, as diffusers' training scripts do
(torchvision's Resize(image_size) + CenterCrop(image_size) on a PIL image;
the filter `resample`, bilinear there by default). uint8 pixels. With
image_size 0 the stored size is kept and must be one size for all.

Record order, fixed at build time, makes `get` random access, so
pipeline.py's batches (per process, resumed at any step) are exact:

* folder: the lines of `metadata.jsonl` (Hugging Face imagefolder:
  {"file_name": "a.png", "text": "..."} per line, file_name relative to the
  file's folder), in `path/<split>/` or, for split 'train', `path/`.
* webdataset: the shards in the order the path names them (brace list
  {a,b} or {000..009}, globs sorted), the samples in tar order. A sample is
  the members sharing a key (the name up to the first dot of its base
  name): one image (.jpg .jpeg .png .webp) and one caption (.txt .text
  .caption: the file's text; or .json: its caption field). The shards'
  headers are listed once (tarfile); an image is then read by offset.
* TFDS: a prepared (ArrayRecord) split with an 'image' feature and a text
  feature, read per batch.
* digits: scikit-learn's 8x8 digits (digits.py; float32 in [-1, 1], as the
  'digits' set) with one of `PHRASINGS` per record.

caption_key names the caption field: the metadata.jsonl key, the .json
field or the TFDS feature (a '/' path into nested features; of a sequence of
captions the first is read). '' takes 'text', else 'caption'.
"""

from collections.abc import Callable, Sequence
import functools
import glob
import io
import json
import os
import pathlib
import re
import tarfile
import zlib

import numpy as np
from PIL import Image
from PIL import UnidentifiedImageError
import tensorflow_datasets as tfds

from cm_jax.data import digits
from cm_jax.data import image_folder
from cm_jax.data import source as source_lib
from cm_jax.data import tfds_source

MAX_LENGTH = 77  # CLIP's context: Stable Diffusion's prompt length
METADATA = 'metadata.jsonl'
DEFAULT_CAPTION_KEYS = ('text', 'caption')
IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png', '.webp')
TEXT_EXTENSIONS = ('txt', 'text', 'caption')  # as diffusers' LCM scripts
IMAGE_EXTENSIONS = tuple(s[1:] for s in IMAGE_SUFFIXES)
RESAMPLE = {
    'bilinear': Image.Resampling.BILINEAR,
    'bicubic': Image.Resampling.BICUBIC,
    'lanczos': Image.Resampling.LANCZOS,
}
DIGIT_WORDS = (
    'zero', 'one', 'two', 'three', 'four',
    'five', 'six', 'seven', 'eight', 'nine',
)
PHRASINGS = (
    'a handwritten {word}',
    'the digit {digit}',
    'a drawing of the number {word}',
    'a handwritten digit {digit}',
    'the number {word}, written by hand',
    'a picture of the digit {word}',
)
PHRASING_SEED = 23

# tokenize(captions) -> int32 [n, k, L].
Tokenize = Callable[[list[str]], np.ndarray]

# What PIL raises on bytes it cannot identify or decode.
_IMAGE_ERRORS = (
    OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError
)


def _one_line(error: BaseException) -> str:
  return ' '.join(str(error).split()) or type(error).__name__


# --- Tokenizing and images ----------------------------------------------------


def clip_tokenize(
    tokenizers: Sequence, captions: list[str], max_length: int = MAX_LENGTH
) -> np.ndarray:
  """int32 [n, k, max_length]: each of the k tokenizers' ids (clip_text.tokenize)."""
  from cm_jax.models import clip_text  # pylint: disable=g-import-not-at-top
  return np.stack(
      [clip_text.tokenize(t, captions, max_length) for t in tokenizers],
      axis=1,
  )


def caption_tokenizer(
    tokenizers: Sequence, max_length: int = MAX_LENGTH
) -> Tokenize:
  """Returns tokenize(captions) -> int32 [n, k, max_length], picklable.

  Args:
    tokenizers: the pipeline's k CLIP tokenizers (clip_text.load_tokenizer),
      in the order of its text encoders.
    max_length: tokens per caption, padded and truncated.
  """
  return functools.partial(clip_tokenize, tuple(tokenizers), max_length=max_length)


def caption_ids(tokenize: Tokenize, captions: list[str]) -> np.ndarray:
  """tokenize(captions) as int32 [n, k, L], its shape checked."""
  ids = np.asarray(tokenize(list(captions)))
  if (
      ids.ndim != 3
      or ids.shape[0] != len(captions)
      or not np.issubdtype(ids.dtype, np.integer)
  ):
    raise ValueError(
        f'tokenize returned {ids.dtype} {list(ids.shape)} for'
        f' {len(captions)} captions; it must return int ids [n, k, L]'
        ' (k tokenizers, L tokens).'
    )
  return ids.astype(np.int32)


def resize_center_crop(
    image: Image.Image, size: int, resample: str = 'bilinear'
) -> np.ndarray:
  """uint8 [size, size, 3]: RGB, shorter side to `size`, centre crop.

  torchvision's Resize(size) then CenterCrop(size) on a PIL image: the
  longer side becomes int(size * long / short), the crop starts at
  int(round((side - size) / 2)). size 0 keeps the image as it is.
  """
  image = image.convert('RGB')
  if not size:
    return np.asarray(image)
  w, h = image.size
  if w <= h:
    new_w, new_h = size, int(size * h / w)
  else:
    new_w, new_h = int(size * w / h), size
  if (new_w, new_h) != (w, h):
    image = image.resize((new_w, new_h), RESAMPLE[resample])
  top = int(round((new_h - size) / 2.0))
  left = int(round((new_w - size) / 2.0))
  return np.asarray(image.crop((left, top, left + size, top + size)))


def _check_resample(resample: str):
  if resample not in RESAMPLE:
    raise ValueError(
        f'data.resample={resample!r} is not one of {sorted(RESAMPLE)}.'
    )


def _decode(data: bytes, size: int, resample: str, where: str) -> np.ndarray:
  """Decodes image bytes; a failure is a ValueError naming `where`."""
  try:
    with Image.open(io.BytesIO(data)) as image:
      return resize_center_crop(image, size, resample)
  except _IMAGE_ERRORS as e:
    unknown = isinstance(e, UnidentifiedImageError)
    reason = 'PIL does not know its format' if unknown else _one_line(e)
    raise ValueError(f'{where} is not a readable image ({reason}).') from e


def _stack(images: list[np.ndarray], where: Callable[[int], str]) -> np.ndarray:
  """Stacks images of one shape; else names the first of another size."""
  for i, image in enumerate(images):
    if image.shape != images[0].shape:
      raise ValueError(
          f'{where(i)} is {image.shape[0]}x{image.shape[1]}, not'
          f' {images[0].shape[0]}x{images[0].shape[1]} like {where(0)}; set'
          ' data.image_size to resize all images to one size.'
      )
  return np.stack(images)


# --- The source --------------------------------------------------------------


class CaptionedSource:
  """A Source of images with captions; subclasses define `_read`.

  Attributes:
    shape, dtype, num_classes: as every Source.
    tokenize: tokenize(captions) -> int32 [n, k, L], or None (no
      'caption_ids' in `get`).
  """

  shape: tuple[int, ...]
  dtype: np.dtype
  num_classes: int
  tokenize: Tokenize | None

  def __len__(self) -> int:
    raise NotImplementedError

  def _read(
      self, indices: np.ndarray
  ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(images, int32 labels, captions) of the records at `indices`."""
    raise NotImplementedError

  def captions(self, indices) -> list[str]:
    """Returns the captions of the records at `indices`, in that order."""
    return self._read(np.asarray(indices))[2]

  def get(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    """Returns image, label and (with a tokenize) caption_ids at `indices`."""
    images, labels, captions = self._read(np.asarray(indices))
    batch = {'image': images, 'label': labels}
    if self.tokenize is not None:
      batch['caption_ids'] = caption_ids(self.tokenize, captions)
    return batch


def is_captioned(source) -> bool:
  """Whether `source` gives captions (and, with a tokenize, caption_ids)."""
  return isinstance(source, CaptionedSource)


class _ListedCaptions(CaptionedSource):
  """Captions and labels held in memory, images read by `_images`."""

  def __init__(self, captions, labels, num_classes, tokenize):
    if not captions:  # the builders name the file; this is the last guard
      raise ValueError('A captioned source needs at least one record.')
    self._captions = list(captions)
    self._labels = np.asarray(labels, np.int32)
    self.num_classes = num_classes
    self.tokenize = tokenize

  def __len__(self) -> int:
    return len(self._captions)

  def _images(self, indices: np.ndarray) -> np.ndarray:
    raise NotImplementedError

  def captions(self, indices) -> list[str]:
    return [self._captions[i] for i in np.asarray(indices)]

  def _read(self, indices):
    return self._images(indices), self._labels[indices], self.captions(indices)


# --- Digits ------------------------------------------------------------------


def digit_caption(label: int, phrasing: int) -> str:
  """PHRASINGS[phrasing] for digit `label`: 'a handwritten seven', ..."""
  return PHRASINGS[phrasing].format(word=DIGIT_WORDS[label], digit=label)


def caption_digit(caption: str) -> int:
  """The digit a caption of `digit_caption` names (-1 when none or several)."""
  words = re.findall(r'[a-z]+|\d', caption.lower())
  found = {
      DIGIT_WORDS.index(w) if w in DIGIT_WORDS else int(w)
      for w in words
      if w in DIGIT_WORDS or w.isdigit()
  }
  return found.pop() if len(found) == 1 else -1


class DigitsCaptions(_ListedCaptions):
  """The digits (float32 [N, 8, 8, 1] in [-1, 1]) with their captions."""

  def __init__(self, images, labels, tokenize):
    phrasings = np.random.default_rng(PHRASING_SEED).integers(
        len(PHRASINGS), size=len(labels)
    )
    captions = [digit_caption(int(l), int(p)) for l, p in zip(labels, phrasings)]
    super().__init__(captions, labels, digits.NUM_CLASSES, tokenize)
    self._pixels = np.asarray(images, np.float32)
    self.shape = self._pixels.shape[1:]
    self.dtype = self._pixels.dtype

  def _images(self, indices):
    return self._pixels[indices]


def captioned_digits_source(
    split: str, data_dir: str, image_size: int, tokenize: Tokenize | None = None
) -> DigitsCaptions:
  """The digits split of digits.py, each record with one of PHRASINGS.

  The phrasing of the i-th record of the split is draw i of
  default_rng(PHRASING_SEED).integers(len(PHRASINGS)): fixed per record.
  """
  source_lib.check_stored_size('captioned_digits', (8, 8, 1), image_size)
  images, labels = digits.load_digits(split, data_dir)
  return DigitsCaptions(images, labels, tokenize)


# --- Image folder with metadata.jsonl ----------------------------------------


def _caption_of(record: dict, caption_key: str, where: str) -> str:
  """The caption field of a metadata line or .json member."""
  keys = (caption_key,) if caption_key else DEFAULT_CAPTION_KEYS
  for key in keys:
    if key in record:
      if not isinstance(record[key], str):
        raise ValueError(
            f'{where}: its {key!r} is {type(record[key]).__name__}, not a'
            ' string.'
        )
      return record[key]
  raise ValueError(
      f'{where} has no caption: no {" or ".join(map(repr, keys))} field'
      ' (set data.caption_key to the field that holds it).'
  )


def read_metadata(
    metadata: pathlib.Path, caption_key: str = ''
) -> tuple[list[pathlib.Path], list[str]]:
  """(image files, captions) of a metadata.jsonl, in its line order.

  Raises:
    ValueError: naming file and line of a line that is not a JSON object,
      lacks file_name or the caption, or names a missing or repeated
      file; naming an image of the folder no line names; for no lines.
  """
  folder = metadata.parent
  files, captions, seen = [], [], {}
  with metadata.open(encoding='utf-8') as lines:
    for number, line in enumerate(lines, 1):
      where = f'{metadata}:{number}'
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f'{where} is not JSON ({e.msg}).') from None
      if not isinstance(record, dict) or 'file_name' not in record:
        raise ValueError(
            f'{where} is not a JSON object with a "file_name" (got'
            f' {line.strip()[:60]!r}).'
        )
      name = str(record['file_name'])
      path = folder / name
      if not path.is_file():
        raise ValueError(
            f'{where}: the caption of {name!r} has no image: {path} does not'
            ' exist.'
        )
      key = path.resolve()
      if key in seen:
        raise ValueError(
            f'{where}: {name!r} is captioned again (first on line'
            f' {seen[key]}).'
        )
      seen[key] = number
      captions.append(_caption_of(record, caption_key, f'{where} ({name})'))
      files.append(path)
  if not files:
    raise ValueError(f'{metadata} holds no captioned images.')
  _check_no_orphans(metadata, seen)
  return files, captions


def _check_no_orphans(metadata: pathlib.Path, seen) -> None:
  """Raises ValueError naming an image of the folder that no line of `metadata` captions."""
  folder = metadata.parent
  # Images another metadata.jsonl below captions (a split folder), and
  # hidden ones, are not this file's.
  others = {m.parent for m in folder.rglob(METADATA) if m != metadata}
  orphans = sorted(
      p
      for p in folder.rglob('*')
      if p.suffix.lower() in IMAGE_SUFFIXES
      and p.resolve() not in seen
      and not others.intersection(p.parents)
      and not any(part.startswith('.') for part in p.relative_to(folder).parts)
  )
  if orphans:
    more = f' (and {len(orphans) - 1} other images)' if len(orphans) > 1 else ''
    raise ValueError(
        f'{orphans[0]}{more} has no caption: no line of {metadata} names it.'
    )


def find_metadata(path: str, split: str) -> pathlib.Path:
  """path/<split>/metadata.jsonl, else (split 'train') path/metadata.jsonl;
  or `path` itself when it is a .jsonl file."""
  root = pathlib.Path(path).expanduser()
  if not path or not root.exists():
    raise ValueError(f'Captioned folder path {path!r} does not exist.')
  if root.is_file():
    if root.suffix != '.jsonl':
      raise ValueError(f'Captioned folder path {path!r} is a file but not .jsonl.')
    return root
  candidates = [root / split / METADATA] + ([root / METADATA] if split == 'train' else [])
  for candidate in candidates:
    if candidate.is_file():
      return candidate
  raise ValueError(
      f'No {" or ".join(map(str, candidates))}: a captioned folder holds a'
      f' {METADATA} of {{"file_name": ..., "text": ...}} lines.'
  )


class FolderCaptions(_ListedCaptions):
  """Image files listed by a metadata.jsonl, decoded per batch."""

  def __init__(self, files, captions, image_size, resample, tokenize):
    super().__init__(captions, np.zeros(len(files), np.int32), 0, tokenize)
    _check_resample(resample)
    self._files = list(files)
    self._image_size = image_size
    self._resample = resample
    # Every header, read now: a file that is not an image is named here.
    self.shape = image_folder.image_shape(self._files, image_size)
    self.dtype = np.dtype(np.uint8)

  def _images(self, indices):
    images = []
    for i in indices:
      path = self._files[i]
      try:
        data = path.read_bytes()
      except OSError as e:
        raise ValueError(f'{path} cannot be read ({_one_line(e)}).') from e
      images.append(_decode(data, self._image_size, self._resample, str(path)))
    return _stack(images, lambda j: str(self._files[indices[j]]))


def captioned_folder_source(
    path: str,
    split: str,
    image_size: int,
    caption_key: str = '',
    tokenize: Tokenize | None = None,
    resample: str = 'bilinear',
) -> FolderCaptions:
  """The images and captions a metadata.jsonl lists (see `find_metadata`).

  Args:
    path: the folder (or its metadata.jsonl).
    split: the split folder, if the folder has one.
    image_size: side of the square crop; 0 keeps the stored size.
    caption_key: the caption's key in each line ('': 'text', else 'caption').
    tokenize: tokenize(captions) -> int32 [n, k, L], or None.
    resample: 'bilinear', 'bicubic' or 'lanczos'.
  """
  files, captions = read_metadata(find_metadata(path, split), caption_key)
  return FolderCaptions(files, captions, image_size, resample, tokenize)


# --- webdataset .tar shards --------------------------------------------------


def expand_braces(pattern: str) -> list[str]:
  """'a{0..2}b' -> a0b a1b a2b (zero-padded as written), 'a{x,y}' -> ax ay."""
  match = re.search(r'\{([^{}]*)\}', pattern)
  if not match:
    return [pattern]
  head, tail = pattern[: match.start()], pattern[match.end() :]
  body = match.group(1)
  span = re.fullmatch(r'(\d+)\.\.(\d+)', body)
  if span:
    first, last = span.groups()
    width = len(first)
    options = [f'{i:0{width}d}' for i in range(int(first), int(last) + 1)]
  else:
    options = body.split(',')
  return [p for o in options for p in expand_braces(head + o + tail)]


def shard_paths(path: str) -> list[pathlib.Path]:
  """The .tar shards `path` names: a folder (its *.tar), a brace list, globs."""
  if not path:
    raise ValueError('data.path names no webdataset shards (a glob, a brace list or a folder of .tar).')
  paths = []
  for pattern in expand_braces(os.path.expanduser(path)):
    if os.path.isdir(pattern):
      paths += sorted(pathlib.Path(pattern).glob('*.tar'))
    elif glob.has_magic(pattern):
      paths += sorted(map(pathlib.Path, glob.glob(pattern)))
    elif os.path.isfile(pattern):
      paths.append(pathlib.Path(pattern))
    else:
      raise ValueError(f'webdataset shard {pattern} does not exist.')
  paths = list(dict.fromkeys(paths))
  if not paths:
    raise ValueError(f'No .tar shards match data.path {path!r}.')
  return paths


def _key_and_extension(name: str) -> tuple[str | None, str]:
  """webdataset's split: 'dir/k.ext.x' -> ('dir/k', 'ext.x') (lower case)."""
  match = re.fullmatch(r'((?:.*/|)[^./]+)\.([^/]*)', name)
  return (match.group(1), match.group(2).lower()) if match else (None, '')


def index_shard(
    shard: pathlib.Path, caption_key: str
) -> tuple[list[str], list[int], list[int], list[str]]:
  """(keys, image offsets, image sizes, captions) of one shard's samples.

  Raises:
    ValueError: naming the shard when it is not a complete uncompressed
      tar, and the sample whose image or caption is missing.
  """
  samples, texts_read = _scan_shard(shard)
  keys, offsets, sizes, captions = [], [], [], []
  for key, members in samples.items():
    where = f'{shard}: sample {key!r}'
    images = [e for e in IMAGE_EXTENSIONS if e in members]
    if not images:
      raise ValueError(f'{where} has a caption but no .jpg/.jpeg/.png/.webp image.')
    member = members[images[0]]
    keys.append(f'{key}.{images[0]}')
    offsets.append(member.offset_data)
    sizes.append(member.size)
    captions.append(_sample_caption(where, key, members, texts_read, caption_key))
  return keys, offsets, sizes, captions


def _scan_shard(
    shard: pathlib.Path,
) -> tuple[dict[str, dict[str, tarfile.TarInfo]], dict[str, str]]:
  """({key: {extension: member}}, {'<key>.<ext>': text}) of a shard's image and caption members.

  Raises:
    ValueError: naming the shard when it is not a complete uncompressed tar.
  """
  samples: dict[str, dict[str, tarfile.TarInfo]] = {}
  texts_read: dict[str, str] = {}
  size = shard.stat().st_size
  try:
    with tarfile.open(shard, 'r:') as tar:
      end = 0  # of the last member's padded data
      for member in tar:
        padded = -member.size % tarfile.BLOCKSIZE
        end = max(end, member.offset_data + member.size + padded)
        if not member.isfile():
          continue
        key, ext = _key_and_extension(member.name)
        if key is None:
          continue
        if member.offset_data + member.size > size:
          raise tarfile.ReadError(f'{member.name} is cut short')
        if ext in IMAGE_EXTENSIONS or ext in TEXT_EXTENSIONS or ext == 'json':
          samples.setdefault(key, {})[ext] = member
        if ext in TEXT_EXTENSIONS or ext == 'json':
          data = tar.extractfile(member).read()
          if len(data) != member.size:
            raise tarfile.ReadError(f'{member.name} is cut short')
          texts_read[f'{key}.{ext}'] = data.decode('utf-8', 'replace')
      # tarfile ends its listing quietly at a cut between members; a
      # complete archive has a zero block (its end marker) there.
      tar.fileobj.seek(end)
      if tar.fileobj.read(tarfile.BLOCKSIZE) != tarfile.NUL * tarfile.BLOCKSIZE:
        raise tarfile.ReadError(f'no end-of-archive block after byte {end}')
  except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
    raise ValueError(
        f'webdataset shard {shard} is not a complete uncompressed .tar'
        f' ({_one_line(e)}): replace it.'
    ) from None
  return samples, texts_read


def _sample_caption(where, key, members, texts_read, caption_key) -> str:
  """A sample's caption: its first text member's, else its .json's caption field.

  Raises:
    ValueError: naming the sample when it has no caption or its .json is not a JSON object.
  """
  texts = [e for e in TEXT_EXTENSIONS if e in members]
  if texts:
    return texts_read[f'{key}.{texts[0]}'].strip()
  if 'json' not in members:
    raise ValueError(
        f'{where} has an image but no caption (.txt, .text, .caption or'
        ' .json).'
    )
  try:
    record = json.loads(texts_read[f'{key}.json'])
  except json.JSONDecodeError as e:
    raise ValueError(f'{where}: its .json is not JSON ({e.msg}).') from None
  if not isinstance(record, dict):
    raise ValueError(f'{where}: its .json is not a JSON object.')
  return _caption_of(record, caption_key, f'{where} (.json)')


class WebdatasetCaptions(_ListedCaptions):
  """Samples of .tar shards, indexed once, images read by offset per batch."""

  def __init__(self, shards, caption_key, image_size, resample, tokenize):
    _check_resample(resample)
    self._shards = list(shards)
    shard_of, names, offsets, sizes, captions = [], [], [], [], []
    for i, shard in enumerate(self._shards):
      keys, shard_offsets, shard_sizes, shard_captions = index_shard(
          shard, caption_key
      )
      shard_of += [i] * len(keys)
      names += keys
      offsets += shard_offsets
      sizes += shard_sizes
      captions += shard_captions
    if not captions:
      raise ValueError(
          f'The webdataset shards {[str(s) for s in self._shards][:3]} hold'
          ' no captioned images.'
      )
    super().__init__(captions, np.zeros(len(names), np.int32), 0, tokenize)
    self._shard_of = np.asarray(shard_of, np.int32)
    self._names = names
    self._offsets = np.asarray(offsets, np.int64)
    self._sizes = np.asarray(sizes, np.int64)
    self._image_size = image_size
    self._resample = resample
    if image_size:
      self.shape = (image_size, image_size, 3)
    else:  # the first image's size; another size is named when read
      self.shape = self._images(np.array([0]))[0].shape
    self.dtype = np.dtype(np.uint8)

  def _where(self, i: int) -> str:
    return f'{self._shards[self._shard_of[i]]}: {self._names[i]}'

  def _images(self, indices):
    images = [None] * len(indices)
    order = np.argsort(self._shard_of[indices], kind='stable')
    handle, current = None, -1
    try:
      for j in order:
        i = indices[j]
        shard = self._shard_of[i]
        if shard != current:
          if handle:
            handle.close()
          handle, current = open(self._shards[shard], 'rb'), shard
        handle.seek(self._offsets[i])
        data = handle.read(self._sizes[i])
        if len(data) != self._sizes[i]:
          raise ValueError(
              f'webdataset shard {self._shards[shard]} is cut short (changed'
              f' since it was indexed?) at {self._names[i]}: replace it.'
          )
        images[j] = _decode(data, self._image_size, self._resample, self._where(i))
    except OSError as e:
      raise ValueError(
          f'webdataset shard {self._shards[current]} cannot be read'
          f' ({_one_line(e)}).'
      ) from e
    finally:
      if handle:
        handle.close()
    return _stack(images, lambda j: self._where(indices[j]))


def webdataset_source(
    path: str,
    image_size: int,
    caption_key: str = '',
    tokenize: Tokenize | None = None,
    resample: str = 'bilinear',
) -> WebdatasetCaptions:
  """The samples of the .tar shards `path` names (see `shard_paths`).

  Args:
    path: a folder of .tar, a glob, or a brace list such as
      'data/{00000..00009}.tar'.
    image_size: side of the square crop; 0 keeps the stored size.
    caption_key: the field of a .json caption ('': 'text', else 'caption').
    tokenize: tokenize(captions) -> int32 [n, k, L], or None.
    resample: 'bilinear', 'bicubic' or 'lanczos'.
  """
  return WebdatasetCaptions(
      shard_paths(path), caption_key, image_size, resample, tokenize
  )


# --- TFDS --------------------------------------------------------------------


def tfds_caption_feature(features, caption_key: str = '') -> str | None:
  """The path of the caption feature: caption_key, or 'text'/'caption' if
  the set has one at its top level (else None).

  Raises:
    ValueError: when caption_key names no feature.
  """
  if not caption_key:
    return next((k for k in DEFAULT_CAPTION_KEYS if k in features), None)
  node = features
  for part in caption_key.split('/'):
    if isinstance(node, tfds.features.Sequence):
      node = node.feature
    if not isinstance(node, tfds.features.FeaturesDict) or part not in node:
      raise ValueError(
          f'data.caption_key={caption_key!r} is not a feature of the TFDS'
          f' set (its features: {sorted(features.keys())}).'
      )
    node = node[part]
  return caption_key


def _text(value, where: str) -> str:
  """A decoded text feature: bytes or str, of a sequence the first."""
  if isinstance(value, np.ndarray) and value.ndim == 0:
    value = value.item()
  if isinstance(value, (list, tuple, np.ndarray)):
    if not len(value):
      raise ValueError(f'{where} has no caption (an empty sequence).')
    return _text(value[0], where)
  if isinstance(value, bytes):
    return value.decode('utf-8', 'replace')
  if isinstance(value, str):
    return value
  raise ValueError(f'{where}: its caption is {type(value).__name__}, not text.')


class TfdsCaptions(CaptionedSource):
  """A prepared TFDS split with an 'image' and a text feature."""

  def __init__(self, name, records, caption_key, image_size, resample, tokenize):
    _check_resample(resample)
    features = records.dataset_info.features
    feature = tfds_caption_feature(features, caption_key)
    if feature is None:
      raise ValueError(
          f'TFDS data set {name!r} has no {" or ".join(DEFAULT_CAPTION_KEYS)}'
          ' feature: set data.caption_key to its text feature.'
      )
    if 'image' not in features:
      raise ValueError(f'TFDS data set {name!r} has no "image" feature.')
    image = features['image']
    if image.np_dtype != np.uint8:
      raise ValueError(f'TFDS data set {name!r} stores {image.np_dtype} images, not uint8.')
    if not image_size and None in image.shape:
      raise ValueError(
          f'TFDS data set {name!r} stores images of varying size'
          f' {image.shape}: set data.image_size to resize and crop them.'
      )
    if not len(records):
      raise ValueError(f'Split {records.split!r} of TFDS data set {name!r} is empty.')
    label = features['label'] if 'label' in features else None
    self._name = name
    self._records = records
    self._caption_key = caption_key
    self._feature = feature.split('/')
    self._image_size = image_size
    self._resample = resample
    self.tokenize = tokenize
    self.shape = (image_size, image_size, 3) if image_size else tuple(image.shape)
    self.dtype = np.dtype(np.uint8)
    self.num_classes = (
        label.num_classes if isinstance(label, tfds.features.ClassLabel) else 0
    )

  def __len__(self) -> int:
    return len(self._records)

  def _caption(self, example, index) -> str:
    value = example
    for part in self._feature:
      value = value[part]
    return _text(value, f'TFDS data set {self._name!r} record {index}')

  def _examples(self, indices) -> list:
    return self._records.__getitems__([int(i) for i in indices])

  def captions(self, indices) -> list[str]:
    indices = np.asarray(indices)
    return [self._caption(ex, i) for ex, i in zip(self._examples(indices), indices)]

  def _read(self, indices):
    examples = self._examples(indices)
    images = []
    for example in examples:
      pixels = np.asarray(example['image'])
      if self._image_size:
        if pixels.shape[-1] == 1:
          pixels = pixels[..., 0]
        pixels = resize_center_crop(
            Image.fromarray(pixels), self._image_size, self._resample
        )
      images.append(pixels)
    labels = [int(ex['label']) if self.num_classes else 0 for ex in examples]
    captions = [self._caption(ex, i) for ex, i in zip(examples, indices)]
    return np.stack(images), np.array(labels, np.int32), captions

  def __reduce__(self):
    """Pickles as the split's prepared folder (as tfds_source.TfdsSource)."""
    directory = self._records.dataset_info.data_dir
    return _reopen_tfds, (
        self._name, directory, self._records.split, self._caption_key,
        self._image_size, self._resample, self.tokenize,
    )


def _reopen_tfds(name, directory, split, caption_key, image_size, resample, tokenize):
  records = tfds.builder_from_directory(directory).as_data_source(split)
  return TfdsCaptions(name, records, caption_key, image_size, resample, tokenize)


def tfds_captioned_source(
    name: str,
    split: str,
    data_dir: str,
    image_size: int,
    caption_key: str = '',
    tokenize: Tokenize | None = None,
    resample: str = 'bilinear',
    records=None,
) -> TfdsCaptions:
  """A prepared TFDS split read with its captions.

  Args:
    name, split, data_dir: as tfds_source.tfds_source.
    image_size: side of the square crop; 0 keeps the stored (fixed) size.
    caption_key: the text feature ('/' into nested features; '': 'text',
      else 'caption').
    tokenize: tokenize(captions) -> int32 [n, k, L], or None.
    resample: 'bilinear', 'bicubic' or 'lanczos'.
    records: the split's data source when already open.
  """
  records = records if records is not None else tfds_source.open_tfds(name, split, data_dir)
  return TfdsCaptions(name, records, caption_key, image_size, resample, tokenize)
