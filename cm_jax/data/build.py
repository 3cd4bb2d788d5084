"""Builds the record source named by a data config."""

import ml_collections
import tensorflow_datasets as tfds

from cm_jax.data import digits
from cm_jax.data import image_folder
from cm_jax.data import source
from cm_jax.data import tfds_source
from cm_jax.data import toy

BUILTIN_NAMES = (*toy.NAMES, 'digits', 'image_folder')


def build_source(config: ml_collections.ConfigDict) -> source.Source:
  """Returns the source of `config.split` of data set `config.name`.

  Args:
    config: with fields name, split, data_dir, path, image_size, num_records
      and seed; see the package docstring.

  Returns:
    A built-in set ('gmm', 'checkerboard', 'rings', 'digits',
    'image_folder') or, for any other name, the prepared TFDS data set.

  Raises:
    ValueError: for a name that is neither built in nor known to TFDS, or a
      missing image folder.
  """
  if config.name in toy.NAMES:
    return toy.toy_source(config.name, config.num_records, config.seed)
  if config.name == 'digits':
    return digits.digits_source(
        config.split, config.data_dir, config.image_size
    )
  if config.name == 'image_folder':
    return image_folder.image_folder_source(
        config.path, config.split, config.image_size, config.data_dir
    )
  try:
    return tfds_source.tfds_source(
        config.name, config.split, config.data_dir, config.image_size
    )
  except tfds.core.DatasetNotFoundError:
    # TFDS's own message lists every registered data set: too long to help.
    raise ValueError(
        f'Unknown data set name {config.name!r}: it is not a built-in name'
        f' {BUILTIN_NAMES} and TFDS does not know it.'
    ) from None
