"""Data sets and the resumable input pipeline.

`build_source(config)` reads a data config with fields:

* name: 'gmm', 'checkerboard', 'rings' (2-D toy sets), 'digits'
  (scikit-learn digits), 'image_folder', or any TFDS name such as 'cifar10'
  or 'imagenet_resized/64x64' (prepared in ArrayRecord format).
* split: e.g. 'train' or 'test' (ignored by the toy sets).
* data_dir: TFDS data dir ('' = TFDS default); for 'digits' where it is built
  ('' = ~/.cache/cm_jax/tfds); for 'image_folder' where archives are
  extracted ('' = ~/.cache/cm_jax/image_folder).
* path: the image folder or .tar.gz for 'image_folder'.
* image_size: 0 keeps the stored size; image folders are resized to it.
* num_records, seed: size and seed of the generated toy sets.

A source's `get(indices)` returns {'image': [n, *shape] as stored (uint8
pixels for image sets, float32 in [-1, 1] for toy points and digits), 'label':
int32 [n]}; `source.to_model_range` maps images to [-1, 1], in the train step.
`BatchIterator` turns a source into globally sharded batches in the order fixed
by `global_batch_indices`.
"""

from cm_jax.data.build import BUILTIN_NAMES
from cm_jax.data.build import build_source
from cm_jax.data.digits import load_digits
from cm_jax.data.pipeline import BatchIterator
from cm_jax.data.pipeline import global_batch_indices
from cm_jax.data.pipeline import process_batch_indices
from cm_jax.data.source import ArraySource
from cm_jax.data.source import Source
