"""Tests of the data sources: toy sets, digits, TFDS by name, image folders."""

import pathlib
import tarfile

import jax
import ml_collections
import numpy as np
from PIL import Image
import pytest
from sklearn import datasets
import tensorflow_datasets as tfds
from tensorflow_datasets.testing import mocking

from cm_jax import data
from cm_jax.data import digits
from cm_jax.data import source as source_lib
from cm_jax.data import toy


def make_config(**overrides) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict({
      'name': 'gmm',
      'split': 'train',
      'data_dir': '',
      'path': '',
      'image_size': 0,
      'num_records': 1000,
      'seed': 0,
  })
  config.update(overrides)
  return config


def check_batch(batch, source, n, dtype=np.float32):
  """Shapes and dtypes; image sets return their stored uint8 pixels."""
  assert batch['image'].shape == (n, *source.shape)
  assert batch['image'].dtype == dtype == source.dtype
  assert batch['label'].shape == (n,)
  assert batch['label'].dtype == np.int32


def test_to_model_range_maps_stored_pixels_and_keeps_floats():
  pixels = np.array([0, 1, 127, 128, 254, 255], np.uint8)
  expected = [-1.0, -253 / 255, -1 / 255, 1 / 255, 253 / 255, 1.0]  # (2p - 255) / 255, by hand
  np.testing.assert_allclose(source_lib.to_model_range(pixels), expected, atol=1e-7)
  assert source_lib.to_model_range(pixels).dtype == np.float32
  np.testing.assert_allclose(jax.jit(source_lib.to_model_range)(pixels), expected, atol=1e-7)
  floats = np.array([-1.0, 0.25, 1.0], np.float32)
  assert source_lib.to_model_range(floats) is floats


# --- Toy sets ---------------------------------------------------------------


@pytest.mark.parametrize('name', toy.NAMES)
def test_toy_set_is_a_function_of_its_seed(name):
  first = data.build_source(make_config(name=name, seed=3))
  again = data.build_source(make_config(name=name, seed=3))
  other = data.build_source(make_config(name=name, seed=4))
  assert len(first) == 1000 and first.shape == (2,)
  np.testing.assert_array_equal(first.images, again.images)
  np.testing.assert_array_equal(first.labels, again.labels)
  assert not np.array_equal(first.images, other.images)
  indices = np.array([5, 0, 999])
  batch = first.get(indices)
  check_batch(batch, first, 3)
  np.testing.assert_array_equal(batch['image'], first.images[indices])


def test_gmm_moments_match_the_analytic_ones():
  source = data.build_source(make_config(num_records=200_000, seed=1))
  means = toy.gmm_means()
  mean = means.mean(axis=0)
  cov = toy.GMM_STD**2 * np.eye(2) + np.cov(means.T, bias=True)
  np.testing.assert_allclose(source.images.mean(axis=0), mean, atol=0.01)
  np.testing.assert_allclose(np.cov(source.images.T), cov, atol=0.01)
  # Each point lies near the mean of the component its label names.
  distance = np.linalg.norm(source.images - means[source.labels], axis=1)
  assert distance.max() < 6 * toy.GMM_STD
  assert source.num_classes == toy.GMM_COMPONENTS
  np.testing.assert_allclose(
      np.bincount(source.labels) / len(source), 1 / 8, atol=0.01
  )


def test_checkerboard_fills_only_the_dark_cells():
  points = data.build_source(make_config(name='checkerboard')).images
  assert np.all(np.abs(points) <= 1)
  cells = np.floor((points + 1) * toy.CHECKERBOARD_CELLS / 2).astype(int)
  assert np.all(cells.sum(axis=1) % 2 == 0)
  # All 8 dark cells are used.
  assert len(np.unique(cells, axis=0)) == toy.CHECKERBOARD_CELLS**2 // 2


def test_rings_points_lie_on_their_labelled_ring():
  source = data.build_source(make_config(name='rings'))
  radius = np.linalg.norm(source.images, axis=1)
  expected = np.asarray(toy.RINGS_RADII)[source.labels]
  assert np.abs(radius - expected).max() < 6 * toy.RINGS_STD
  assert set(source.labels) == {0, 1}


# --- Digits -----------------------------------------------------------------


def test_digits_builder_writes_array_record_and_matches_sklearn(tmp_path):
  train = data.build_source(make_config(name='digits', data_dir=str(tmp_path)))
  test = data.build_source(
      make_config(name='digits', split='test', data_dir=str(tmp_path))
  )
  written = sorted(p.name for p in tmp_path.glob('cm_jax_digits/*/*'))
  assert 'cm_jax_digits-train.array_record-00000-of-00001' in written
  assert 'cm_jax_digits-test.array_record-00000-of-00001' in written
  assert (len(train), len(test)) == (1437, 360)
  assert train.shape == (8, 8, 1) and train.num_classes == 10

  reference = datasets.load_digits()
  is_test = np.arange(len(reference.images)) % 5 == 0
  for source, mask in ((train, ~is_test), (test, is_test)):
    batch = source.get(np.arange(len(source)))
    check_batch(batch, source, len(source))
    expected = reference.images[mask][..., None] / 8 - 1
    np.testing.assert_allclose(batch['image'], expected, atol=1e-6)
    np.testing.assert_array_equal(batch['label'], reference.target[mask])


def test_load_digits_reads_through_tfds_data_source(tmp_path, monkeypatch):
  calls = []
  real_data_source = tfds.data_source

  def spy(*args, **kwargs):
    calls.append((args, kwargs))
    return real_data_source(*args, **kwargs)

  monkeypatch.setattr(tfds, 'data_source', spy)
  images, labels = digits.load_digits('test', str(tmp_path))
  assert calls and calls[0][0][0] == 'cm_jax_digits'
  assert images.shape == (360, 8, 8, 1) and images.dtype == np.float32
  assert labels.dtype == np.int32
  assert images.min() == -1 and images.max() == 1


def test_digits_refuses_to_resize(tmp_path):
  with pytest.raises(ValueError, match='image_size'):
    data.build_source(
        make_config(name='digits', data_dir=str(tmp_path), image_size=16)
    )


# --- TFDS by name -----------------------------------------------------------


class CmJaxTestImages(tfds.core.GeneratorBasedBuilder):
  """Six random 4x4 RGB images in 3 classes, PNG-encoded (no TensorFlow)."""

  VERSION = tfds.core.Version('1.0.0')
  IMAGES = np.random.default_rng(0).integers(0, 256, (6, 4, 4, 3), np.uint8)

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(4, 4, 3)),
            'label': tfds.features.ClassLabel(num_classes=3),
        }),
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    return {'train': self._generate_examples()}

  def _generate_examples(self):
    # TFDS encodes numpy images with TensorFlow but PIL images with PIL.
    for i, image in enumerate(self.IMAGES):
      yield i, {'image': Image.fromarray(image), 'label': i % 3}


def test_tfds_name_reads_prepared_array_record_files(tmp_path):
  """A real prepared TFDS set, read by name through `tfds.data_source`."""
  CmJaxTestImages(
      data_dir=tmp_path, file_format='array_record'
  ).download_and_prepare()
  config = make_config(name='cm_jax_test_images', data_dir=str(tmp_path))
  source = data.build_source(config)
  assert (len(source), source.shape, source.num_classes) == (6, (4, 4, 3), 3)
  batch = source.get(np.array([4, 1]))
  check_batch(batch, source, 2, np.uint8)
  np.testing.assert_array_equal(batch['image'], CmJaxTestImages.IMAGES[[4, 1]])
  np.testing.assert_array_equal(batch['label'], [1, 1])


def test_tfds_split_that_is_not_prepared_is_a_clear_error(tmp_path):
  with pytest.raises(ValueError, match='not prepared'):
    data.build_source(make_config(name='cifar10', data_dir=str(tmp_path)))


def test_tfds_name_with_mocked_cifar10(monkeypatch):
  """cifar10 by name, with `tfds.testing.mock_data` standing in for the files.

  mock_data does patch `tfds.data_source` (through
  `DatasetBuilder.as_data_source`): our code runs unchanged, on a real
  `ArrayRecordDataSource` whose underlying reader is a mock. In TFDS 4.9.10
  that mock's batched `__getitems__` is set as a plain MagicMock attribute and
  so is called without `self`; we replace the helper it wraps with one that
  does not need `self`.
  """
  monkeypatch.setattr(
      mocking, '_getitems', lambda keys, generator: [generator[k] for k in keys]
  )
  with tfds.testing.mock_data(num_examples=20):
    source = data.build_source(make_config(name='cifar10'))
    batch = source.get(np.array([7, 3, 7]))
    reversed_batch = source.get(np.array([7, 3])[::-1])
  assert len(source) == 20
  assert (source.shape, source.num_classes) == ((32, 32, 3), 10)
  check_batch(batch, source, 3, np.uint8)
  assert batch['image'].min() < 10 and batch['image'].max() > 245
  assert np.all((0 <= batch['label']) & (batch['label'] < 10))
  np.testing.assert_array_equal(batch['image'][0], batch['image'][2])
  np.testing.assert_array_equal(
      batch['image'][:2], reversed_batch['image'][::-1]
  )


def test_unknown_name_is_a_value_error_naming_it():
  with pytest.raises(ValueError, match="'no_such_data_set'.*digits"):
    data.build_source(make_config(name='no_such_data_set'))


# --- Image folders ----------------------------------------------------------


def write_image_folder(root: pathlib.Path) -> dict[str, list[np.ndarray]]:
  """Writes root/{train,test}/{cat,dog}/*.png; returns the RGB images."""
  rng = np.random.default_rng(0)
  written = {}
  for split, count in (('train', 3), ('test', 1)):
    written[split] = []
    for name in ('dog', 'cat'):  # Written out of order: labels sort by name.
      folder = root / split / name
      folder.mkdir(parents=True)
      for i in range(count):
        pixels = rng.integers(0, 256, (6, 6, 3), np.uint8)
        Image.fromarray(pixels).save(folder / f'{i}.png')
    for name in ('cat', 'dog'):
      for i in range(count):
        pixels = np.asarray(Image.open(root / split / name / f'{i}.png'))
        written[split].append(pixels)
  # A grayscale image is read as three equal channels.
  gray = rng.integers(0, 256, (6, 6), np.uint8)
  Image.fromarray(gray).save(root / 'train' / 'dog' / '3.png')
  written['train'].append(np.repeat(gray[..., None], 3, axis=2))
  (root / 'train' / 'dog' / 'notes.txt').write_text('not an image')
  return written


def folder_config(path, **overrides):
  return make_config(name='image_folder', path=str(path), **overrides)


def test_image_folder_reads_labels_and_values(tmp_path):
  written = write_image_folder(tmp_path / 'pets')
  for split, labels in (('train', [0, 0, 0, 1, 1, 1, 1]), ('test', [0, 1])):
    source = data.build_source(folder_config(tmp_path / 'pets', split=split))
    assert (len(source), source.shape, source.num_classes) == (
        len(labels),
        (6, 6, 3),
        2,
    )
    order = np.arange(len(source))[::-1]
    batch = source.get(order)
    check_batch(batch, source, len(source), np.uint8)
    np.testing.assert_array_equal(batch['label'], np.array(labels)[order])
    np.testing.assert_array_equal(batch['image'], np.stack(written[split])[order])


def test_image_folder_resizes_with_pil_bicubic(tmp_path):
  written = write_image_folder(tmp_path / 'pets')
  source = data.build_source(folder_config(tmp_path / 'pets', image_size=3))
  assert source.shape == (3, 3, 3)
  resized = Image.fromarray(written['train'][1]).resize(
      (3, 3), Image.Resampling.BICUBIC
  )
  np.testing.assert_array_equal(source.get(np.array([1]))['image'][0], np.asarray(resized))


def test_image_folder_from_tar_gz_is_extracted_once(tmp_path, monkeypatch):
  written = write_image_folder(tmp_path / 'pets')
  archive = tmp_path / 'pets.tar.gz'
  with tarfile.open(archive, 'w:gz') as tar:
    tar.add(tmp_path / 'pets', arcname='pets')  # Under a top-level folder.
  cache = tmp_path / 'cache'
  config = folder_config(archive, split='test', data_dir=str(cache))
  source = data.build_source(config)
  np.testing.assert_array_equal(source.get(np.arange(2))['label'], [0, 1])
  np.testing.assert_array_equal(source.get(np.arange(2))['image'], np.stack(written['test']))
  assert len(list(cache.iterdir())) == 1

  def no_extraction(*args, **kwargs):
    raise AssertionError('the archive was extracted a second time')

  monkeypatch.setattr(tarfile, 'open', no_extraction)
  assert len(data.build_source(config)) == 2


def test_image_folder_errors(tmp_path):
  with pytest.raises(ValueError, match='does not exist'):
    data.build_source(folder_config(tmp_path / 'missing'))
  with pytest.raises(ValueError, match='does not exist'):
    data.build_source(folder_config(''))
  (tmp_path / 'empty' / 'train' / 'cat').mkdir(parents=True)
  with pytest.raises(ValueError, match='No .png'):
    data.build_source(folder_config(tmp_path / 'empty'))
  with pytest.raises(ValueError, match="No split folder 'test'"):
    data.build_source(folder_config(tmp_path / 'empty', split='test'))


def test_image_folder_with_mixed_sizes_needs_image_size(tmp_path):
  """Sizes are read from the headers when the folder is listed: the second image is named before any batch."""
  for name, size in (('a', 4), ('b', 5)):
    (tmp_path / 'train' / name).mkdir(parents=True)
    Image.new('RGB', (size, size)).save(tmp_path / 'train' / name / 'x.png')
  with pytest.raises(ValueError, match=r'b/x.png is 5x5, not 4x4 like .*a/x.png; set image_size'):
    data.build_source(folder_config(tmp_path))
  resized = data.build_source(folder_config(tmp_path, image_size=4))
  assert resized.get(np.arange(2))['image'].shape == (2, 4, 4, 3)


def _break(path: pathlib.Path, how: str) -> None:
  """Replaces an image file by text, or cuts it after its header."""
  if how == 'text':
    path.write_text('not an image')
  else:
    path.write_bytes(path.read_bytes()[:60])


@pytest.mark.parametrize('how', ['text', 'truncated'])
@pytest.mark.parametrize('which', ['cat/0.png', 'dog/2.png'])  # the first file listed, and a later one
def test_a_broken_image_is_named_in_one_line(tmp_path, which, how):
  """A file that is not an image is named when the folder is listed; one cut after its header (which lists) when
  the batch holding it is decoded."""
  write_image_folder(tmp_path / 'pets')
  broken = tmp_path / 'pets' / 'train' / which
  _break(broken, how)
  message = f'^{broken} is not a readable image \\([^\n]+\\): remove or replace it.$'
  if how == 'text':
    with pytest.raises(ValueError, match=message):
      data.build_source(folder_config(tmp_path / 'pets'))
    return
  source = data.build_source(folder_config(tmp_path / 'pets'))
  with pytest.raises(ValueError, match=message):
    source.get(np.arange(len(source)))


def _archive(tmp_path, how: str) -> pathlib.Path:
  """pets.tar.gz written complete and then cut to 60% ('truncated'), or 2 kB of random bytes ('garbage')."""
  archive = tmp_path / 'pets.tar.gz'
  if how == 'garbage':
    archive.write_bytes(np.random.default_rng(0).integers(0, 256, 2048, np.uint8).tobytes())
    return archive
  write_image_folder(tmp_path / 'pets')
  with tarfile.open(archive, 'w:gz') as tar:
    tar.add(tmp_path / 'pets', arcname='pets')
  archive.write_bytes(archive.read_bytes()[: archive.stat().st_size * 6 // 10])
  return archive


@pytest.mark.parametrize('how', ['truncated', 'garbage'])
def test_a_broken_archive_is_named_and_leaves_nothing_behind(tmp_path, how):
  archive = _archive(tmp_path, how)
  cache = tmp_path / 'cache'
  with pytest.raises(ValueError, match=f'^{archive} is not a complete .tar.gz archive \\([^\n]+\\): replace it'):
    data.build_source(folder_config(archive, data_dir=str(cache)))
  assert list(cache.iterdir()) == []  # no extracted folder and no temporary one


def test_an_archive_cache_that_cannot_be_written_is_named(tmp_path):
  write_image_folder(tmp_path / 'pets')
  archive = tmp_path / 'pets.tar.gz'
  with tarfile.open(archive, 'w:gz') as tar:
    tar.add(tmp_path / 'pets', arcname='pets')
  (tmp_path / 'a_file').write_text('')
  with pytest.raises(ValueError, match=f'cannot extract {archive} into {tmp_path / "a_file"} .*data.data_dir'):
    data.build_source(folder_config(archive, data_dir=str(tmp_path / 'a_file')))
