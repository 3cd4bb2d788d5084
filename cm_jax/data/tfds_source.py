"""Random access to a prepared TFDS image set (cifar10, imagenet_resized...).

Records are read and decoded per batch with `tfds.data_source`, so large sets
are never loaded into memory. The split must already be prepared in a
random-access format (ArrayRecord): nothing is downloaded from a training job.
"""

import numpy as np
import tensorflow_datasets as tfds

from cm_jax.data import source


class TfdsSource:
  """A source over one split of a TFDS data set with a uint8 'image' feature."""

  def __init__(self, name: str, records):
    features = records.dataset_info.features
    if 'image' not in features:
      raise ValueError(f'TFDS data set {name!r} has no "image" feature.')
    image = features['image']
    if None in image.shape or image.np_dtype != np.uint8:
      raise ValueError(
          f'TFDS data set {name!r} must store fixed-size uint8 images; its'
          f' "image" feature has shape {image.shape} and dtype'
          f' {image.np_dtype}.'
      )
    label = features['label'] if 'label' in features else None
    self._name = name
    self._records = records
    self.shape = tuple(image.shape)
    self.dtype = np.dtype(np.uint8)
    self.num_classes = (
        label.num_classes if isinstance(label, tfds.features.ClassLabel) else 0
    )

  def __len__(self) -> int:
    """Returns the number of records in the split."""
    return len(self._records)

  def get(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    """Reads and decodes the records at `indices`, in that order (uint8 images)."""
    examples = self._records.__getitems__(indices.tolist())
    labels = [ex['label'] if self.num_classes else 0 for ex in examples]
    return {
        'image': np.stack([ex['image'] for ex in examples]),
        'label': np.array(labels, np.int32),
    }

  def __reduce__(self):
    """Pickles as the split's prepared folder, reopened from its files.

    Worker processes (data.workers) unpickle the source. Reopening with
    `tfds.builder_from_directory` needs no builder class: one defined in a
    script's __main__ would be pickled by value and clash with the copy that
    the worker registers when it imports that script.
    """
    directory = self._records.dataset_info.data_dir
    return _reopen, (self._name, directory, self._records.split)


def _reopen(name: str, directory: str, split: str) -> TfdsSource:
  """Opens `split` of the TFDS set prepared in `directory` (its version's)."""
  records = tfds.builder_from_directory(directory).as_data_source(split)
  return TfdsSource(name, records)


def open_tfds(name: str, split: str, data_dir: str):
  """tfds.data_source of a prepared (ArrayRecord) split.

  Raises:
    tfds.core.DatasetNotFoundError: for a name TFDS does not know.
    ValueError: for a split that is not prepared.
  """
  try:
    return tfds.data_source(
        name,
        split=split,
        data_dir=data_dir or None,
        download=False,
        builder_kwargs={'file_format': 'array_record'},
    )
  except KeyError as err:  # TFDS's error for a split that is not prepared.
    raise ValueError(
        f'Split {split!r} of TFDS data set {name!r} is not prepared in data_dir'
        f' {data_dir or "(TFDS default)"}; prepare it in ArrayRecord format'
        f' first. TFDS said: {err}'
    ) from err


def tfds_source(
    name: str, split: str, data_dir: str, image_size: int
) -> TfdsSource:
  """Opens `split` of the prepared TFDS set `name` ('' data_dir: default)."""
  records = open_tfds(name, split, data_dir)
  result = TfdsSource(name, records)
  source.check_stored_size(name, result.shape, image_size)
  return result
