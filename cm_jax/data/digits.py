"""scikit-learn's 8x8 digits as a TFDS data set stored in ArrayRecord files.

The 1797 images of `sklearn.datasets.load_digits()` are split by a fixed rule
on their index i in that order: i % 5 == 0 goes to 'test' (360 images), the
rest to 'train' (1437 images). Records keep that order. Pixels are stored raw
(uint8 0..16); readers map them to [-1, 1] with x / 8 - 1.

The set is prepared on first use into the data dir (`DEFAULT_DATA_DIR` when
none is given) and read back through `tfds.data_source`; it needs no download.
"""

import os

import numpy as np
from sklearn import datasets
import tensorflow_datasets as tfds

from cm_jax.data import source

DEFAULT_DATA_DIR = os.path.expanduser('~/.cache/cm_jax/tfds')
NUM_CLASSES = 10
TEST_EVERY = 5


class CmJaxDigits(tfds.core.GeneratorBasedBuilder):
  """Builder of the digits set; registered in TFDS as 'cm_jax_digits'."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}

  def __init__(self, **kwargs):
    super().__init__(file_format='array_record', **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description='scikit-learn 8x8 digits, raw pixel values 0..16.',
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Tensor(shape=(8, 8, 1), dtype=np.uint8),
            'label': tfds.features.ClassLabel(num_classes=NUM_CLASSES),
        }),
        supervised_keys=('image', 'label'),
        # Keep the scikit-learn order instead of shuffling by key hash.
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    return {
        'train': self._generate_examples(is_test=False),
        'test': self._generate_examples(is_test=True),
    }

  def _generate_examples(self, is_test: bool):
    digits = datasets.load_digits()
    for i, (image, label) in enumerate(zip(digits.images, digits.target)):
      if (i % TEST_EVERY == 0) == is_test:
        yield i, {'image': image.astype(np.uint8)[..., None], 'label': label}


def load_digits(
    split: str, data_dir: str = ''
) -> tuple[np.ndarray, np.ndarray]:
  """Returns (images float32 [N, 8, 8, 1] in [-1, 1], labels int32 [N])."""
  data_dir = data_dir or DEFAULT_DATA_DIR
  try:
    CmJaxDigits(data_dir=data_dir).download_and_prepare()
  except FileExistsError:
    pass  # another process prepared it at the same time (TFDS's final rename lost the race): it is there now
  records = tfds.data_source(
      CmJaxDigits.name, split=split, data_dir=data_dir, download=False
  )
  examples = records.__getitems__(list(range(len(records))))
  images = np.stack([ex['image'] for ex in examples]).astype(np.float32)
  labels = np.array([ex['label'] for ex in examples], np.int32)
  return images / 8.0 - 1.0, labels


def digits_source(
    split: str, data_dir: str, image_size: int
) -> source.ArraySource:
  """Returns the digits split as an in-memory source."""
  source.check_stored_size('digits', (8, 8, 1), image_size)
  images, labels = load_digits(split, data_dir)
  return source.ArraySource(images, labels, NUM_CLASSES)
