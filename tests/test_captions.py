"""Tests of the captioned sources: metadata.jsonl folders, webdataset shards, TFDS, captioned digits."""

import io
import json
import multiprocessing
import pathlib
import pickle
import tarfile

import jax
import ml_collections
import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds
from tensorflow_datasets.testing import mocking

from cm_jax import data
from cm_jax.data import captions
import sd_fixtures

BILINEAR = Image.Resampling.BILINEAR


def make_config(**overrides) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict(dict(
      name='captioned_folder', split='train', data_dir='', path='', image_size=0, num_records=0, seed=0))
  config.update(overrides)
  return config


@pytest.fixture(scope='module')
def tokenizers(tmp_path_factory):
  """Two CLIP tokenizers of one vocabulary, padding with <|endoftext|> and with '!' (SDXL's tokenizer_2 pads so)."""
  from transformers import CLIPTokenizer  # pylint: disable=g-import-not-at-top
  from cm_jax.models import clip_text  # pylint: disable=g-import-not-at-top
  folder = sd_fixtures.write_clip_tokenizer(tmp_path_factory.mktemp('tokenizer'))
  return clip_text.load_tokenizer(folder), CLIPTokenizer.from_pretrained(str(folder), pad_token='!')


def reference_ids(tokenizers, texts):
  """int32 [n, k, 77]: each tokenizer's own padded, truncated ids."""
  per_tokenizer = [t(list(texts), padding='max_length', max_length=77, truncation=True)['input_ids']
                   for t in tokenizers]
  return np.asarray(per_tokenizer, np.int32).transpose(1, 0, 2)


def pixels(rng, height, width):
  return rng.integers(0, 256, (height, width, 3), np.uint8)


def png_bytes(image: np.ndarray) -> bytes:
  out = io.BytesIO()
  Image.fromarray(image).save(out, format='PNG')
  return out.getvalue()


# --- Resize and crop ---------------------------------------------------------

# (width, height) -> PIL size after the resize and crop box, worked by hand for image_size 4: the shorter side to 4,
# the longer int(4 * long / short); the crop starts at int(round(excess / 2)), Python's round-half-even.
CROPS = {
    (12, 8): ((6, 4), (1, 0, 5, 4)),  # excess 2: starts at 1
    (7, 10): ((4, 5), (0, 0, 4, 4)),  # 4 * 10 / 7 = 5.71 -> 5; excess 1: round(0.5) = 0
    (9, 5): ((7, 4), (2, 0, 6, 4)),  # 7.2 -> 7; excess 3: round(1.5) = 2
    (4, 4): (None, (0, 0, 4, 4)),  # already 4 x 4: not resampled
    (3, 3): ((4, 4), (0, 0, 4, 4)),  # upsampled
}


@pytest.mark.parametrize('size', list(CROPS))
def test_resize_center_crop_is_torchvision_resize_then_center_crop(size):
  image = Image.fromarray(pixels(np.random.default_rng(1), size[1], size[0]))
  resized, box = CROPS[size]
  expected = (image.resize(resized, BILINEAR) if resized else image).crop(box)
  got = captions.resize_center_crop(image, 4)
  assert got.shape == (4, 4, 3) and got.dtype == np.uint8
  np.testing.assert_array_equal(got, np.asarray(expected))
  bicubic = (image.resize(resized, Image.Resampling.BICUBIC) if resized else image).crop(box)
  np.testing.assert_array_equal(captions.resize_center_crop(image, 4, 'bicubic'), np.asarray(bicubic))


def test_grayscale_and_rgba_become_rgb():
  gray = Image.fromarray(np.arange(16, dtype=np.uint8).reshape(4, 4) * 10)
  got = captions.resize_center_crop(gray, 0)
  np.testing.assert_array_equal(got, np.repeat(np.asarray(gray)[..., None], 3, axis=2))
  rgba = Image.new('RGBA', (4, 4), (10, 20, 30, 40))
  assert captions.resize_center_crop(rgba, 4)[0, 0].tolist() == [10, 20, 30]


# --- Captioned folder (metadata.jsonl) ---------------------------------------

FOLDER = [  # file name, (height, width), caption
    ('a.png', (8, 12), 'a photo of a cat'),
    ('sub/b.png', (10, 7), 'a dog'),
    ('c.jpg', (5, 9), 'the astronaut'),
    ('d.webp', (6, 6), 'a photo of a dog, a cat and an astronaut on the digit seven'),
]


def write_folder(root: pathlib.Path, entries=FOLDER, key='text') -> list[np.ndarray]:
  """Writes the images and metadata.jsonl; returns the images as PIL decodes them from disk (JPEG is lossy)."""
  rng = np.random.default_rng(0)
  lines, written = [], []
  for name, (h, w), text in entries:
    (root / name).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels(rng, h, w)).save(root / name)
    written.append(np.asarray(Image.open(root / name).convert('RGB')))
    lines.append(json.dumps({'file_name': name, key: text, 'extra': 1}))
  (root / 'metadata.jsonl').write_text('\n'.join(lines) + '\n\n')  # a blank last line is skipped
  return written


def expected_crop(image: np.ndarray, size: int = 4) -> np.ndarray:
  """The CROPS recipe, through PIL alone."""
  h, w = image.shape[:2]
  resized, box = CROPS[(w, h)] if (w, h) in CROPS else ((size, size), (0, 0, size, size))
  pil = Image.fromarray(image)
  return np.asarray((pil.resize(resized, BILINEAR) if resized and resized != (w, h) else pil).crop(box))


def test_folder_reads_images_captions_and_ids(tmp_path, tokenizers):
  written = write_folder(tmp_path / 'set')
  source = data.build_source(make_config(path=str(tmp_path / 'set'), image_size=4),
                             tokenize=captions.caption_tokenizer(tokenizers))
  assert captions.is_captioned(source)
  assert (len(source), source.shape, source.dtype, source.num_classes) == (4, (4, 4, 3), np.uint8, 0)
  order = np.array([3, 0, 2, 1, 0])
  batch = source.get(order)
  assert sorted(batch) == ['caption_ids', 'image', 'label']
  texts = [FOLDER[i][2] for i in order]
  assert source.captions(order) == texts
  np.testing.assert_array_equal(batch['image'], np.stack([expected_crop(written[i]) for i in order]))
  np.testing.assert_array_equal(batch['label'], np.zeros(5, np.int32))
  assert batch['caption_ids'].dtype == np.int32 and batch['caption_ids'].shape == (5, 2, 77)
  np.testing.assert_array_equal(batch['caption_ids'], reference_ids(tokenizers, texts))
  assert not np.array_equal(batch['caption_ids'][:, 0], batch['caption_ids'][:, 1])  # the two pad tokens


def test_folder_without_tokenize_gives_no_ids_and_keeps_sizes_when_asked(tmp_path):
  entries = [('x.png', (5, 6), 'a cat'), ('y.png', (5, 6), 'a dog')]
  written = write_folder(tmp_path, entries, key='caption')  # the 'caption' key, found when 'text' is absent
  source = data.build_source(make_config(path=str(tmp_path)))
  batch = source.get(np.array([1, 0]))
  assert sorted(batch) == ['image', 'label'] and source.shape == (5, 6, 3)
  np.testing.assert_array_equal(batch['image'], np.stack(written[::-1]))
  assert source.captions([1, 0]) == ['a dog', 'a cat']


def test_folder_split_folder_and_named_caption_key(tmp_path):
  write_folder(tmp_path / 'test', FOLDER[:2], key='prompt')
  write_folder(tmp_path / 'test' / 'nested', FOLDER[2:], key='prompt')  # its images are not test's orphans
  (tmp_path / 'test' / '.cache').mkdir()
  Image.new('RGB', (4, 4)).save(tmp_path / 'test' / '.cache' / 'thumb.png')  # hidden: skipped
  config = make_config(path=str(tmp_path), split='test', caption_key='prompt', image_size=4)
  assert data.build_source(config).captions([0, 1]) == ['a photo of a cat', 'a dog']
  with pytest.raises(ValueError, match=r"has no caption: no 'text' or 'caption' field \(set data.caption_key"):
    data.build_source(make_config(path=str(tmp_path), split='test'))
  with pytest.raises(ValueError, match=r'No .*train/metadata.jsonl or .*metadata.jsonl: a captioned folder'):
    data.build_source(make_config(path=str(tmp_path)))


# --- webdataset shards ---------------------------------------------------------


def add(tar: tarfile.TarFile, name: str, payload: bytes):
  info = tarfile.TarInfo(name)
  info.size = len(payload)
  tar.addfile(info, io.BytesIO(payload))


def write_shards(folder: pathlib.Path, count=2, per_shard=3, sizes=((8, 12), (10, 7), (5, 9))):
  """shard-00000.tar ...: samples k.png + k.txt, or k.json {"caption": ...} (the second of each shard), with a
  .cls member (ignored) and a member of another folder's key; returns (images, captions) in record order."""
  folder.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(3)
  images, texts = [], []
  for s in range(count):
    with tarfile.open(folder / f'shard-{s:05d}.tar', 'w') as tar:
      for j in range(per_shard):
        key = f'{s:03d}{j:03d}'
        image = pixels(rng, *sizes[j % len(sizes)])
        text = f'a photo of a cat {s} {j}'
        if j == 2:  # a key in a folder, split at the first dot of the base name as webdataset does
          add(tar, f'sub/{key}.v1.png', png_bytes(image))
          add(tar, f'sub/{key}.v1.txt', b'not this one')
          add(tar, f'sub/{key}.png', png_bytes(image))
          add(tar, f'sub/{key}.txt', (text + '\n').encode())
        elif j == 1:
          add(tar, f'{key}.json', json.dumps({'caption': text, 'url': 'x'}).encode())
          add(tar, f'{key}.png', png_bytes(image))
        else:
          add(tar, f'{key}.png', png_bytes(image))
          add(tar, f'{key}.txt', (text + '\n').encode())
          add(tar, f'{key}.cls', b'3')
        images.append(image)
        texts.append(text)
  return images, texts


@pytest.mark.parametrize('pattern', ['{dir}/shard-{{00000..00001}}.tar', '{dir}/shard-*.tar', '{dir}',
                                     '{dir}/shard-{{00000,00001}}.tar'])
def test_webdataset_shards_in_order_with_ids(tmp_path, tokenizers, pattern):
  images, texts = write_shards(tmp_path / 'shards')
  path = pattern.format(dir=tmp_path / 'shards')
  source = data.build_source(make_config(name='webdataset', path=path, image_size=4),
                             tokenize=captions.caption_tokenizer(tokenizers[:1]))
  assert (len(source), source.shape, source.num_classes) == (6, (4, 4, 3), 0)
  order = np.array([5, 0, 4, 1, 3, 2])
  batch = source.get(order)
  assert source.captions(order) == [texts[i] for i in order]
  np.testing.assert_array_equal(batch['image'], np.stack([expected_crop(images[i]) for i in order]))
  np.testing.assert_array_equal(batch['caption_ids'], reference_ids(tokenizers[:1], [texts[i] for i in order]))
  assert batch['caption_ids'].shape == (6, 1, 77)


def test_webdataset_brace_order_is_kept_and_braces_expand():
  assert captions.expand_braces('a{08..10}b{x,y}') == ['a08bx', 'a08by', 'a09bx', 'a09by', 'a10bx', 'a10by']


def test_webdataset_keeps_stored_size_when_all_agree(tmp_path):
  images, _ = write_shards(tmp_path, count=1, sizes=((5, 6),))
  source = data.build_source(make_config(name='webdataset', path=str(tmp_path / 'shard-00000.tar')))
  assert source.shape == (5, 6, 3)
  np.testing.assert_array_equal(source.get(np.arange(3))['image'], np.stack(images))


# --- TFDS ----------------------------------------------------------------------


class CmJaxTestCaptions(tfds.core.GeneratorBasedBuilder):
  """Four PNG images of varying size with a caption, a list of captions and a class (no TensorFlow)."""

  VERSION = tfds.core.Version('1.0.0')
  IMAGES = [pixels(np.random.default_rng(5), *hw) for hw in ((8, 12), (10, 7), (5, 9), (4, 4))]

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(None, None, 3)),
            'caption': tfds.features.Text(),
            'captions': tfds.features.Sequence({'text': tfds.features.Text()}),
            'label': tfds.features.ClassLabel(num_classes=3),
        }),
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    return {'train': self._generate_examples()}

  def _generate_examples(self):
    for i, image in enumerate(self.IMAGES):
      yield i, {'image': Image.fromarray(image), 'caption': f'a cat {i}',
                'captions': {'text': [f'the dog {i}', 'other']}, 'label': i % 3}


def test_tfds_captions_from_prepared_files(tmp_path, tokenizers):
  CmJaxTestCaptions(data_dir=tmp_path, file_format='array_record').download_and_prepare()
  tokenize = captions.caption_tokenizer(tokenizers)
  config = make_config(name='cm_jax_test_captions', data_dir=str(tmp_path), image_size=4)
  source = data.build_source(config, tokenize=tokenize)  # the 'caption' feature, found by name
  assert isinstance(source, captions.TfdsCaptions)
  assert (len(source), source.shape, source.num_classes) == (4, (4, 4, 3), 3)
  order = np.array([2, 0, 3])
  batch = source.get(order)
  np.testing.assert_array_equal(batch['image'], np.stack([expected_crop(CmJaxTestCaptions.IMAGES[i]) for i in order]))
  np.testing.assert_array_equal(batch['label'], order % 3)
  assert source.captions(order) == [f'a cat {i}' for i in order]
  np.testing.assert_array_equal(batch['caption_ids'], reference_ids(tokenizers, [f'a cat {i}' for i in order]))
  nested = data.build_source(make_config(name='cm_jax_test_captions', data_dir=str(tmp_path), image_size=4,
                                         caption_key='captions/text'))
  assert nested.captions([1, 3]) == ['the dog 1', 'the dog 3']  # the first of each list
  again = pickle.loads(pickle.dumps(source))  # workers reopen it from its folder
  np.testing.assert_array_equal(again.get(order)['caption_ids'], batch['caption_ids'])
  with pytest.raises(ValueError, match=r'varying size .*set data.image_size'):
    data.build_source(make_config(name='cm_jax_test_captions', data_dir=str(tmp_path)))
  with pytest.raises(ValueError, match=r"caption_key='nope' is not a feature"):
    data.build_source(make_config(name='cm_jax_test_captions', data_dir=str(tmp_path), image_size=4,
                                  caption_key='nope'))


def test_tfds_captions_with_mock_data(monkeypatch, tokenizers):
  """tfds.testing.mock_data's random records (str captions, random sizes, numpy arrays of captions)."""
  monkeypatch.setattr(mocking, '_getitems', lambda keys, generator: [generator[k] for k in keys])
  with tfds.testing.mock_data(num_examples=6):
    source = data.build_source(make_config(name='cm_jax_test_captions', image_size=4),
                               tokenize=captions.caption_tokenizer(tokenizers))
    batch = source.get(np.array([4, 1, 4]))
    texts = source.captions([4, 1, 4])
    nested = data.build_source(make_config(name='cm_jax_test_captions', image_size=4, caption_key='captions/text'))
    first = nested.captions([2])[0]
  assert batch['image'].shape == (3, 4, 4, 3) and batch['image'].dtype == np.uint8
  assert all(isinstance(t, str) and t for t in texts) and texts[0] == texts[2] != texts[1]
  np.testing.assert_array_equal(batch['caption_ids'], reference_ids(tokenizers, texts))
  assert isinstance(first, str)


def test_a_plain_tfds_set_stays_a_plain_source(tmp_path):
  from test_data_sources import CmJaxTestImages  # pylint: disable=g-import-not-at-top
  CmJaxTestImages(data_dir=tmp_path, file_format='array_record').download_and_prepare()
  source = data.build_source(make_config(name='cm_jax_test_images', data_dir=str(tmp_path)),
                             tokenize=lambda texts: 1 / 0)
  assert not captions.is_captioned(source) and sorted(source.get(np.array([0]))) == ['image', 'label']


# --- Captioned digits ----------------------------------------------------------


def test_captioned_digits(tmp_path, tokenizers):
  source = data.build_source(make_config(name='captioned_digits', data_dir=str(tmp_path)),
                             tokenize=captions.caption_tokenizer(tokenizers))
  plain = data.build_source(make_config(name='digits', data_dir=str(tmp_path)))
  assert (len(source), source.shape, source.dtype, source.num_classes) == (1437, (8, 8, 1), np.float32, 10)
  everything = np.arange(len(source))
  batch = source.get(everything)
  np.testing.assert_array_equal(batch['image'], plain.images)
  np.testing.assert_array_equal(batch['label'], plain.labels)
  texts = source.captions(everything)
  assert [captions.caption_digit(t) for t in texts] == plain.labels.tolist()
  for digit in range(10):  # several phrasings per class, each naming it
    phrasings = {t for t, label in zip(texts, plain.labels) if label == digit}
    assert len(phrasings) == len(captions.PHRASINGS)
  assert captions.digit_caption(7, 0) == 'a handwritten seven'
  assert captions.digit_caption(7, 1) == 'the digit 7'
  again = data.build_source(make_config(name='captioned_digits', data_dir=str(tmp_path)))
  assert again.captions(everything) == texts  # fixed per record
  some = np.array([9, 3, 1000])
  np.testing.assert_array_equal(source.get(some)['caption_ids'], reference_ids(tokenizers, [texts[i] for i in some]))
  test = data.build_source(make_config(name='captioned_digits', split='test', data_dir=str(tmp_path)))
  assert len(test) == 360
  with pytest.raises(ValueError, match='image_size'):
    data.build_source(make_config(name='captioned_digits', data_dir=str(tmp_path), image_size=16))


# --- Through the batch iterator --------------------------------------------------


def data_sharding():
  mesh = jax.make_mesh((jax.device_count(),), ('data',), axis_types=(jax.sharding.AxisType.Auto,))
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))


def test_iterator_carries_caption_ids_sharded_and_resumes_exactly(tmp_path, tokenizers):
  write_shards(tmp_path, count=3, per_shard=5)
  source = data.build_source(make_config(name='webdataset', path=str(tmp_path), image_size=4),
                             tokenize=captions.caption_tokenizer(tokenizers))
  sharding, batch_size = data_sharding(), 2 * jax.device_count()
  with data.BatchIterator(source, batch_size, 4, 0, sharding) as fresh:
    from_start = [next(fresh) for _ in range(5)]  # 5 x 16 records of 15: crosses epoch ends
  with data.BatchIterator(source, batch_size, 4, 2, sharding) as resumed:
    again = [next(resumed) for _ in range(3)]
  for step, batch in enumerate(from_start):
    assert batch['caption_ids'].sharding == sharding and batch['caption_ids'].shape == (batch_size, 2, 77)
    want = source.get(data.global_batch_indices(4, step, batch_size, len(source)))
    for key in ('image', 'label', 'caption_ids'):
      np.testing.assert_array_equal(np.asarray(batch[key]), want[key])
  for a, b in zip(from_start[2:], again):
    for key in ('image', 'label', 'caption_ids'):
      np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]))
  # Two processes' slices of one global batch, read apart, are the global batch's rows.
  slices = [source.get(data.process_batch_indices(4, 3, batch_size, len(source), p, 2)) for p in range(2)]
  whole = source.get(data.global_batch_indices(4, 3, batch_size, len(source)))
  for key in whole:
    np.testing.assert_array_equal(np.concatenate([s[key] for s in slices]), whole[key])


def test_worker_processes_read_the_same_captioned_batches(tmp_path, tokenizers):
  """The tar source and the tokenizer, pickled to a grain worker, give the thread's batches bit for bit."""
  write_shards(tmp_path)
  source = data.build_source(make_config(name='webdataset', path=str(tmp_path), image_size=4),
                             tokenize=captions.caption_tokenizer(tokenizers))
  sharding, batch_size = data_sharding(), jax.device_count()
  before = multiprocessing.active_children()
  with data.BatchIterator(source, batch_size, 1, 3, sharding, workers=1) as workers:
    in_workers = [next(workers) for _ in range(2)]
  assert not [p for p in multiprocessing.active_children() if p not in before]
  for step, batch in zip((3, 4), in_workers):
    want = source.get(data.global_batch_indices(1, step, batch_size, len(source)))
    assert sorted(batch) == sorted(want)
    for key in want:
      np.testing.assert_array_equal(np.asarray(batch[key]), want[key])


# --- Bad input --------------------------------------------------------------------


def one_line(excinfo) -> str:
  message = str(excinfo.value)
  assert '\n' not in message
  return message


def test_an_image_without_a_caption_is_named(tmp_path):
  write_folder(tmp_path, FOLDER[:2])
  Image.new('RGB', (4, 4)).save(tmp_path / 'sub' / 'stray.png')
  with pytest.raises(ValueError, match=r'stray.png has no caption: no line of .*metadata.jsonl names it') as e:
    data.build_source(make_config(path=str(tmp_path)))
  one_line(e)


def test_a_caption_without_an_image_is_named_with_its_line(tmp_path):
  write_folder(tmp_path, FOLDER[:2])
  with open(tmp_path / 'metadata.jsonl', 'a') as f:
    f.write(json.dumps({'file_name': 'gone.png', 'text': 'a cat'}) + '\n')
  with pytest.raises(ValueError, match=r"metadata.jsonl:4: the caption of 'gone.png' has no image"):
    data.build_source(make_config(path=str(tmp_path)))


def test_a_line_that_is_not_json_names_file_and_line(tmp_path):
  write_folder(tmp_path, FOLDER[:2])
  lines = (tmp_path / 'metadata.jsonl').read_text().splitlines()
  lines.insert(1, '{"file_name": "a.png", text: oops}')
  (tmp_path / 'metadata.jsonl').write_text('\n'.join(lines))
  with pytest.raises(ValueError, match=rf'^{tmp_path}/metadata.jsonl:2 is not JSON \(.*\)\.$') as e:
    data.build_source(make_config(path=str(tmp_path)))
  one_line(e)


@pytest.mark.parametrize('line, message', [
    ('[1, 2]', r'metadata.jsonl:3 is not a JSON object with a "file_name"'),
    ('{"file_name": "a.png", "text": "again"}', r"metadata.jsonl:3: 'a.png' is captioned again \(first on line 1\)"),
    ('{"file_name": "c.png", "text": 3}', r"metadata.jsonl:3 \(c.png\): its 'text' is int, not a string"),
])
def test_other_bad_metadata_lines(tmp_path, line, message):
  write_folder(tmp_path, FOLDER[:2])
  Image.new('RGB', (4, 4)).save(tmp_path / 'c.png')
  with open(tmp_path / 'metadata.jsonl', 'w') as f:
    f.write('\n'.join([json.dumps({'file_name': 'a.png', 'text': 'x'}),
                       json.dumps({'file_name': 'sub/b.png', 'text': 'y'}), line]))
  with pytest.raises(ValueError, match=message):
    data.build_source(make_config(path=str(tmp_path)))


def test_empty_caption_sets(tmp_path):
  (tmp_path / 'metadata.jsonl').write_text('\n')
  with pytest.raises(ValueError, match=r'metadata.jsonl holds no captioned images'):
    data.build_source(make_config(path=str(tmp_path)))
  with tarfile.open(tmp_path / 'empty.tar', 'w') as tar:
    add(tar, 'readme.md', b'nothing here')
  with pytest.raises(ValueError, match=r'hold no captioned images'):
    data.build_source(make_config(name='webdataset', path=str(tmp_path / 'empty.tar')))
  with pytest.raises(ValueError, match=r'No .tar shards match data.path'):
    data.build_source(make_config(name='webdataset', path=str(tmp_path / 'none-*.tar')))
  with pytest.raises(ValueError, match=r'shard .*missing.tar does not exist'):
    data.build_source(make_config(name='webdataset', path=str(tmp_path / 'missing.tar')))


@pytest.mark.parametrize('cut', [0.4, 0.75])
def test_a_truncated_shard_is_named(tmp_path, cut):
  write_shards(tmp_path, count=2)
  shard = tmp_path / 'shard-00001.tar'
  payload = shard.read_bytes()
  shard.write_bytes(payload[:int(len(payload) * cut)])
  with pytest.raises(ValueError, match=rf'^webdataset shard {shard} is not a complete uncompressed .tar \(.*\): '
                                       'replace it.$'):
    data.build_source(make_config(name='webdataset', path=str(tmp_path)))


def test_a_corrupt_shard_and_a_corrupt_image_are_named(tmp_path):
  (tmp_path / 'garbage.tar').write_bytes(np.random.default_rng(0).integers(0, 256, 4096, np.uint8).tobytes())
  with pytest.raises(ValueError, match=r'garbage.tar is not a complete uncompressed .tar'):
    data.build_source(make_config(name='webdataset', path=str(tmp_path / 'garbage.tar')))
  with tarfile.open(tmp_path / 'bad.tar', 'w') as tar:
    add(tar, 'k1.png', png_bytes(pixels(np.random.default_rng(0), 4, 4)))
    add(tar, 'k1.txt', b'a cat')
    add(tar, 'k2.jpg', b'not a jpeg')
    add(tar, 'k2.txt', b'a dog')
  source = data.build_source(make_config(name='webdataset', path=str(tmp_path / 'bad.tar'), image_size=4))
  with pytest.raises(ValueError, match=r"bad.tar: k2.jpg is not a readable image \(PIL does not know its format\)"):
    source.get(np.array([0, 1]))


@pytest.mark.parametrize('members, message', [
    ({'k.png': None}, r"sample 'k' has an image but no caption"),
    ({'k.txt': b'a cat'}, r"sample 'k' has a caption but no .jpg"),
    ({'k.png': None, 'k.json': b'{"url": "x"}'}, r"sample 'k' \(.json\) has no caption: no 'text' or 'caption'"),
    ({'k.png': None, 'k.json': b'{oops'}, r"sample 'k': its .json is not JSON"),
])
def test_a_sample_without_image_or_caption_is_named(tmp_path, members, message):
  with tarfile.open(tmp_path / 'one.tar', 'w') as tar:
    for name, payload in members.items():
      add(tar, name, payload or png_bytes(pixels(np.random.default_rng(0), 4, 4)))
  with pytest.raises(ValueError, match=rf'^{tmp_path}/one.tar: {message}') as e:
    data.build_source(make_config(name='webdataset', path=str(tmp_path / 'one.tar')))
  one_line(e)


def test_a_tokenize_of_the_wrong_shape_and_an_unknown_filter_are_refused(tmp_path):
  write_folder(tmp_path, FOLDER[:2])
  source = data.build_source(make_config(path=str(tmp_path), image_size=4),
                             tokenize=lambda texts: np.zeros((len(texts), 77), np.int32))
  with pytest.raises(ValueError, match=r'tokenize returned int32 \[2, 77\] for 2 captions; it must return'):
    source.get(np.arange(2))
  with pytest.raises(ValueError, match=r"data.resample='nearest' is not one of"):
    data.build_source(make_config(path=str(tmp_path), resample='nearest'))


def test_images_of_several_sizes_need_image_size(tmp_path):
  write_folder(tmp_path, FOLDER[:2])
  with pytest.raises(ValueError, match=r'b.png is 10x7, not 8x12 like .*a.png; set image_size'):
    data.build_source(make_config(path=str(tmp_path)))
  write_shards(tmp_path / 'shards', count=1)
  source = data.build_source(make_config(name='webdataset', path=str(tmp_path / 'shards')))
  with pytest.raises(ValueError, match=r'shard-00000.tar: 000001.png is 10x7, not 8x12 like .*000000.png; set'):
    source.get(np.arange(2))
