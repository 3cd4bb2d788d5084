"""--mode=edit's inputs (issue 24, item 2): a folder of images is read as a batch (sorted by name), and a text file
named .png, a folder without images or an input of NaN stop in one line naming the file."""

import numpy as np
import pytest
from PIL import Image

from cm_jax import editing
from test_one_line_errors import _one_line


def test_a_folder_of_images_is_one_batch_in_name_order(tmp_path):
  folder = tmp_path / 'inputs'
  folder.mkdir()
  pixels = np.random.default_rng(0).integers(0, 256, (3, 8, 8), np.uint8)
  for name, image in zip(('b.png', 'a.png', 'c.jpg'), pixels):
    Image.fromarray(image).save(folder / name, quality=100)
  (folder / 'notes.txt').write_text('not an image')  # other files are not inputs
  images = editing.read_images(str(folder), (8, 8, 1))
  assert images.shape == (3, 8, 8, 1) and images.dtype == np.float32
  np.testing.assert_allclose(images[0, ..., 0], pixels[1] / 127.5 - 1.0, atol=1e-6)  # a.png
  np.testing.assert_allclose(images[1, ..., 0], pixels[0] / 127.5 - 1.0, atol=1e-6)  # b.png
  assert np.abs(images[2, ..., 0] - (pixels[2] / 127.5 - 1.0)).max() < 0.2  # c.jpg (lossy)


def test_a_folder_without_images(tmp_path):
  (tmp_path / 'empty').mkdir()
  with pytest.raises(ValueError) as raised:
    editing.read_images(str(tmp_path / 'empty'), (8, 8, 1))
  _one_line(raised, f"edit.input='{tmp_path}/empty' is a folder without .png/.jpg/.jpeg images")


@pytest.mark.parametrize('name, content, fragment', [
    ('notes.png', b'a text file, named .png', 'is not a readable image file (PIL does not know its format)'),
    ('cut.png', None, 'is not a readable image file'),
    ('text.npy', b'not an array', 'is not a readable .npy file'),
])
def test_a_file_that_is_not_what_its_name_says_is_named(tmp_path, name, content, fragment):
  path = tmp_path / name
  if content is None:  # a PNG cut short
    Image.fromarray(np.zeros((8, 8), np.uint8) + 7).save(tmp_path / 'whole.png')
    content = (tmp_path / 'whole.png').read_bytes()[:40]
  path.write_bytes(content)
  with pytest.raises(ValueError) as raised:
    editing.read_images(str(path), (8, 8, 1))
  _one_line(raised, f'{path} {fragment}')


@pytest.mark.parametrize('value', [np.nan, np.inf])
def test_an_input_of_nan_is_not_called_out_of_range(tmp_path, value):
  path = tmp_path / 'bad.npy'
  np.save(path, np.full((2, 8, 8, 1), value, np.float32))
  with pytest.raises(ValueError) as raised:
    editing.read_images(str(path), (8, 8, 1))
  _one_line(raised, f"edit.input='{path}' holds values that are not finite numbers (NaN or inf")
  assert 'outside' not in str(raised.value)
