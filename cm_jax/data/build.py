"""Builds the record source named by a data config."""

import ml_collections
import tensorflow_datasets as tfds

from cm_jax.data import captions
from cm_jax.data import digits
from cm_jax.data import image_folder
from cm_jax.data import source
from cm_jax.data import tfds_source
from cm_jax.data import toy

CAPTIONED_NAMES = ('captioned_digits', 'captioned_folder', 'webdataset')
BUILTIN_NAMES = (*toy.NAMES, 'digits', 'image_folder', *CAPTIONED_NAMES)


def build_source(
    config: ml_collections.ConfigDict,
    tokenize: captions.Tokenize | None = None,
) -> source.Source:
  """Returns the source of `config.split` of data set `config.name`.

  Args:
    config: with fields name, split, data_dir, path, image_size, num_records
      and seed; for captioned sets also caption_key ('' = 'text', else
      'caption') and resample ('bilinear'); see the package docstring.
    tokenize: for a captioned set, tokenize(captions) -> int32 [n, k, L]
      (captions.caption_tokenizer): its `get` adds 'caption_ids'. None: a
      captioned set gives images, labels and `captions(indices)` only.
      Other sets ignore it.

  Returns:
    A built-in set ('gmm', 'checkerboard', 'rings', 'digits',
    'image_folder', 'captioned_digits', 'captioned_folder', 'webdataset')
    or, for any other name, the prepared TFDS data set: captioned
    (captions.TfdsCaptions) when caption_key is set or it has a top-level
    'text' or 'caption' feature.

  Raises:
    ValueError: for a name that is neither built in nor known to TFDS, a
      missing image folder, or a negative image_size.
  """
  if config.get('image_size', 0) < 0:
    raise ValueError(
        f'data.image_size={config.image_size} is negative: give the side of'
        ' the square images in pixels (0 keeps the stored size).'
    )
  caption_key = config.get('caption_key', '')
  resample = config.get('resample', 'bilinear')
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
  if config.name == 'captioned_digits':
    return captions.captioned_digits_source(
        config.split, config.data_dir, config.image_size, tokenize
    )
  if config.name == 'captioned_folder':
    return captions.captioned_folder_source(
        config.path, config.split, config.image_size, caption_key, tokenize,
        resample,
    )
  if config.name == 'webdataset':
    return captions.webdataset_source(
        config.path, config.image_size, caption_key, tokenize, resample
    )
  return _tfds_source(config, caption_key, tokenize, resample)


def _tfds_source(config, caption_key, tokenize, resample) -> source.Source:
  """The prepared TFDS data set `config.name`: captioned when it has a caption feature."""
  try:
    records = tfds_source.open_tfds(config.name, config.split, config.data_dir)
  except tfds.core.DatasetNotFoundError:
    # TFDS's own message lists every registered data set: too long to help.
    raise ValueError(
        f'Unknown data set name {config.name!r}: it is not a built-in name'
        f' {BUILTIN_NAMES} and TFDS does not know it.'
    ) from None
  features = records.dataset_info.features
  if captions.tfds_caption_feature(features, caption_key) is not None:
    return captions.tfds_captioned_source(
        config.name, config.split, config.data_dir, config.image_size,
        caption_key, tokenize, resample, records=records,
    )
  result = tfds_source.TfdsSource(config.name, records)
  source.check_stored_size(config.name, result.shape, config.image_size)
  return result
