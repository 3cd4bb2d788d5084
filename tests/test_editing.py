"""Zero-shot editing (CM paper, Algorithm 4): the orthogonal transforms, the coefficients each task keeps, the loop on
the exact consistency function of Gaussian data (closed forms computed here in numpy), the input checks, and
--mode=edit end to end on a tiny digits run."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from cm_jax import editing
from cm_jax import experiment
from cm_jax import sampling
from cm_jax.parameterization import EDM, TrigFlow
from configs import base
from configs import digits_edm
import helpers
from oracle import EPS, SD, T

SHAPE = (4, 8, 8, 3)  # [B, H, W, C]
WEIGHTS = np.array([0.2989, 0.5870, 0.1140])
PROCESSES = [EDM(sigma_data=SD), TrigFlow(sigma_data=SD)]
A = 2 * SD  # the Gaussian data's std for TrigFlow's exact consistency function (EDM's oracle has std SD)


def _edit_config(**edit):
  c = base.get_config()
  c.edit.update(edit)
  return c


def _dense(transform, shape):
  """The matrix of apply() on images of `shape` (one column per pixel of one image)."""
  basis = np.eye(int(np.prod(shape)), dtype=np.float32).reshape((-1,) + shape)
  return np.asarray(transform[0](jnp.asarray(basis)), np.float64).reshape(len(basis), -1).T


# ----------------------------------------------------------------------------------------------------------
# The transforms.
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('name', ['identity', 'colour', 'patch_2', 'patch_4'])
def test_every_transform_is_orthogonal_and_inverted(name):
  """A A^T = I (dense, numpy) and inverse(apply(x)) = x, on one 8x8x3 image."""
  transform = {'identity': editing.IDENTITY, 'colour': editing.colour_transform(),
               'patch_2': editing.patch_transform(2), 'patch_4': editing.patch_transform(4)}[name]
  a = _dense(transform, SHAPE[1:])
  np.testing.assert_allclose(a @ a.T, np.eye(len(a)), atol=1e-6)
  x = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)
  np.testing.assert_allclose(transform[1](transform[0](x)), x, atol=1e-5)


def test_householder_first_column():
  """Q is orthogonal and symmetric with first column v / |v| (luma, uniform), and I for v along e_1."""
  for v in (WEIGHTS, np.ones(16)):
    q = editing.householder(v)
    np.testing.assert_allclose(q @ q.T, np.eye(len(v)), atol=1e-12)
    np.testing.assert_allclose(q[:, 0], v / np.linalg.norm(v), atol=1e-12)
  np.testing.assert_array_equal(editing.householder([2.0, 0.0, 0.0]), np.eye(3))


def test_first_coefficients_are_the_luma_and_the_patch_means():
  """Colour: c_0 = (0.2989 r + 0.587 g + 0.114 b) / |w| per pixel; patches: c_0 = p * mean of each p x p patch."""
  x = np.random.default_rng(1).standard_normal(SHAPE).astype(np.float32)
  colour = np.asarray(editing.colour_transform()[0](x))
  np.testing.assert_allclose(colour[..., 0], x @ WEIGHTS / np.linalg.norm(WEIGHTS), atol=1e-5)
  for p in (2, 4):
    means = np.array([[x[:, i:i + p, j:j + p].mean(axis=(1, 2)) for j in range(0, 8, p)] for i in range(0, 8, p)])
    coefficients = np.asarray(editing.patch_transform(p)[0](x))  # [B, H/p, W/p, p^2, C]
    np.testing.assert_allclose(coefficients[:, :, :, 0], p * means.transpose(2, 0, 1, 3), atol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# The loop keeps the reference's coefficients, and on the Gaussian oracle it is the closed form.
# ----------------------------------------------------------------------------------------------------------
def _kept(task, x):
  """What the task keeps of images x (numpy, independently of the code): the known pixels of the 'center' mask, the
  luma, the 2x2 patch means (edit.patch_size=2)."""
  if task == 'inpaint':
    known = np.ones(x.shape, bool)
    known[:, 2:6, 2:6] = False
    return x[known]
  if task == 'colorize':
    return x @ WEIGHTS
  return x.reshape(x.shape[0], 4, 2, 4, 2, 3).mean(axis=(2, 4))


def _projectors(task):
  """(P_keep, P_gen) as functions on images: the orthogonal projections onto the kept and generated subspaces
  (they do not depend on how A completes its first column)."""
  if task == 'inpaint':
    gen = np.zeros(SHAPE[1:])
    gen[2:6, 2:6] = 1.0
    keep = lambda x: x * (1 - gen)
  elif task == 'colorize':
    v = WEIGHTS / np.linalg.norm(WEIGHTS)
    keep = lambda x: (x @ v)[..., None] * v
  else:
    keep = lambda x: np.repeat(np.repeat(x.reshape(x.shape[0], 4, 2, 4, 2, 3).mean(axis=(2, 4)), 2, 1), 2, 2)
  return keep, lambda x: x - keep(x)


def _exact(process):
  """(f, k, a, b, ts): the exact consistency function f = k(t) x (jax; k(t) numpy) of Gaussian data (EDM: std SD, k =
  sqrt(eps^2 + sd^2) / sqrt(t^2 + sd^2); TrigFlow: std A, k = A / sqrt(A^2 cos^2 t + sd^2 sin^2 t)), renoise(x, z, t)
  = a(t) x + b(t) z (EDM: 1, sqrt(t^2 - eps^2); TrigFlow: cos t, sd sin t) and two levels ts."""
  if isinstance(process, EDM):
    k = lambda t, xp=np: xp.sqrt(EPS**2 + SD**2) / xp.sqrt(t**2 + SD**2)
    a, b, ts = (lambda t: 1.0), (lambda t: np.sqrt(t**2 - EPS**2)), np.array([T, 0.01])
  else:
    k = lambda t, xp=np: A / xp.sqrt(A**2 * xp.cos(t) ** 2 + SD**2 * xp.sin(t) ** 2)
    a, b, ts = np.cos, (lambda t: SD * np.sin(t)), np.array([process.t_max, 1.1])
  f = lambda x, t: x * k(t, jnp).reshape(-1, 1, 1, 1)
  return f, k, a, b, ts


def _draws(rng, n):
  """The loop's noises: z_n = N(0, I) from fold_in(rng, n), drawn the way editing.edit draws them."""
  return [np.asarray(jax.random.normal(jax.random.fold_in(rng, i), SHAPE), np.float64) for i in range(n)]


@pytest.mark.parametrize('process', PROCESSES, ids=['edm', 'trigflow'])
@pytest.mark.parametrize('task', ['inpaint', 'colorize', 'super_resolve'])
def test_edit_on_the_exact_consistency_function_is_the_closed_form(process, task):
  """Two levels t1 > t2 with f = k(t) x and renoise = a(t) x + b(t) z: the loop gives
  P_keep y + k2 (a2 g1 + b2 P_gen z2), g1 = k1 b1 P_gen z1 (the start A^-1[(A y)(1 - Omega)] has no generated part)."""
  f, k, a, b, ts = _exact(process)
  transform, mask = editing.problem(_edit_config(task=task, patch_size=2).edit, SHAPE[1:])
  y = np.random.default_rng(2).uniform(-1, 1, SHAPE).astype(np.float32)
  rng = jax.random.PRNGKey(4)
  out = np.asarray(jax.jit(lambda y: editing.edit(process, f, y, transform, mask, ts, rng))(y), np.float64)
  keep, gen = _projectors(task)
  z1, z2 = _draws(rng, 2)
  g1 = k(ts[0]) * b(ts[0]) * gen(z1)
  expected = keep(y.astype(np.float64)) + k(ts[1]) * (a(ts[1]) * g1 + b(ts[1]) * gen(z2))
  np.testing.assert_allclose(out, expected, atol=2e-5)


@pytest.mark.parametrize('task', ['inpaint', 'colorize', 'super_resolve'])
def test_every_output_keeps_the_references_coefficients(task):
  """With a network-like f that leaves [-1, 1] (clamped, as sampling.clip_denoised does), 3 levels: the known pixels,
  the luma and the patch means of the result are those of the reference; the generated part is not."""
  process = EDM(sigma_data=SD)
  net = lambda x_in, c_noise: jnp.sin(7.0 * x_in + c_noise[:, None, None, None]) * 3.0
  f = sampling.consistency_fn(process, net, clip=True)
  transform, mask = editing.problem(_edit_config(task=task, patch_size=2).edit, SHAPE[1:])
  y = np.random.default_rng(3).uniform(-1, 1, SHAPE).astype(np.float32)
  out = np.asarray(editing.edit(process, f, y, transform, mask, np.array([T, 5.0, 0.5]), jax.random.PRNGKey(0)))
  np.testing.assert_allclose(_kept(task, out), _kept(task, y), atol=1e-5)
  assert np.abs(out - y).max() > 0.1


def test_stroke_guidance_starts_from_the_strokes():
  """Omega = 1 and the loop starts at the strokes s: x1 = k1 (s + b1 z1), x2 = k2 (x1 + b2 z2) (EDM oracle); the
  default levels are the paper's 5.38, 2.24."""
  process = EDM(sigma_data=SD)
  f, k, _, b, _ = _exact(process)
  config = _edit_config(task='stroke')
  ts = np.array(editing.levels(config, process))
  np.testing.assert_array_equal(ts, [5.38, 2.24])
  transform, mask = editing.problem(config.edit, SHAPE[1:])
  s = np.random.default_rng(5).uniform(-1, 1, SHAPE).astype(np.float32)
  rng = jax.random.PRNGKey(6)
  out = np.asarray(editing.edit(process, f, s, transform, mask, ts, rng, start=s), np.float64)
  z1, z2 = _draws(rng, 2)
  x1 = k(ts[0]) * (s + b(ts[0]) * z1)
  np.testing.assert_allclose(out, k(ts[1]) * (x1 + b(ts[1]) * z2), atol=2e-5)


@pytest.mark.parametrize('process', PROCESSES, ids=['edm', 'trigflow'])
def test_denoising_is_one_step_at_the_known_level(process):
  """y = x0 + sigma z at sigma = 0.7: EDM f(y, sigma) = k(sigma) y; TrigFlow f(cos(t) y, t) = k(t) cos(t) y,
  t = arctan(sigma / sd)."""
  f, k, _, _, _ = _exact(process)
  y = np.random.default_rng(7).standard_normal(SHAPE).astype(np.float32)
  out = np.asarray(editing.denoise(process, f, y, 0.7))
  scale = k(0.7) if isinstance(process, EDM) else k(np.arctan(0.7 / SD)) * np.cos(np.arctan(0.7 / SD))
  np.testing.assert_allclose(out, scale * y, rtol=1e-5)


def test_interpolation_is_the_consistency_function_of_slerped_noise():
  """x = k(T) T z(alpha) for z(alpha) = (sin((1 - alpha) theta) z1 + sin(alpha theta) z2) / sin(theta), alpha =
  0, 1/4, ..., 1 (EDM oracle; theta from numpy's arccos of the normalised dot product)."""
  process = EDM(sigma_data=SD)
  f, k, _, _, _ = _exact(process)
  rng = np.random.default_rng(8)
  z1, z2 = (rng.standard_normal((2,) + SHAPE[1:]).astype(np.float32) for _ in range(2))
  out = np.asarray(editing.interpolate(process, f, z1, z2, 5), np.float64)
  assert out.shape == (2, 5) + SHAPE[1:]
  for i in range(2):
    u, v = z1[i].ravel().astype(np.float64), z2[i].ravel().astype(np.float64)
    theta = np.arccos(u @ v / (np.linalg.norm(u) * np.linalg.norm(v)))
    for j, alpha in enumerate(np.linspace(0, 1, 5)):
      z = (np.sin((1 - alpha) * theta) * z1[i] + np.sin(alpha * theta) * z2[i]) / np.sin(theta)
      np.testing.assert_allclose(out[i, j], k(T) * T * z, rtol=1e-4, atol=1e-6)


def test_the_default_levels_are_the_karras_grid_without_sigma_min():
  """grid_size N: sigma_i = (T^(1/7) + i/(N-1) (eps^(1/7) - T^(1/7)))^7 for i = 0..N-2 (the CM code's ts = 0..N-1,
  whose last step re-noises to eps with zero noise)."""
  process = EDM(sigma_data=SD)
  got = editing.levels(_edit_config(grid_size=18), process)
  expected = [(T ** (1 / 7) + i / 17 * (EPS ** (1 / 7) - T ** (1 / 7))) ** 7 for i in range(17)]
  np.testing.assert_allclose(got, expected, rtol=1e-5)
  assert editing.levels(_edit_config(sigmas=(10.0, 1.0)), process) == (10.0, 1.0)


# ----------------------------------------------------------------------------------------------------------
# Bad input: one clear message each, before any sampling.
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('sigmas', [(1.0, 10.0), (10.0, 10.0), (100.0, 1.0), (10.0, 0.001)])
def test_levels_outside_the_range_or_not_decreasing(sigmas):
  with pytest.raises(ValueError, match=r'edit.sigmas=.* must decrease strictly inside \(sigma_min, sigma_max\]'):
    editing.levels(_edit_config(sigmas=sigmas), EDM(sigma_data=SD))


def test_a_patch_size_that_does_not_divide_and_colorize_on_gray_images():
  with pytest.raises(ValueError, match='edit.patch_size=3 does not divide the 8x8 images'):
    editing.problem(_edit_config(task='super_resolve', patch_size=3).edit, (8, 8, 3))
  with pytest.raises(ValueError, match="edit.task='colorize' needs RGB images; this run's have 1"):
    editing.problem(_edit_config(task='colorize').edit, (8, 8, 1))


def test_masks(tmp_path):
  """'center' and 'box' masks; a file mask must be binary and of the image's size."""
  center = editing.inpaint_mask(_edit_config().edit, (8, 8, 3))
  assert center.shape == (8, 8, 1) and center.sum() == 16 and center[2:6, 2:6].all()
  box = editing.inpaint_mask(_edit_config(mask='box', box=(1, 2, 3, 4)).edit, (8, 8, 3))
  assert box.sum() == 12 and box[1:4, 2:6].all()
  with pytest.raises(ValueError, match=r'edit.box=\(6, 0, 4, 4\) must be'):
    editing.inpaint_mask(_edit_config(mask='box', box=(6, 0, 4, 4)).edit, (8, 8, 3))
  good = np.zeros((8, 8), np.uint8)
  good[:4] = 255
  Image.fromarray(good).save(tmp_path / 'good.png')
  np.testing.assert_array_equal(editing.read_mask(str(tmp_path / 'good.png'), (8, 8, 3))[..., 0], good / 255)
  np.save(tmp_path / 'gray.npy', np.full((8, 8), 0.5))
  with pytest.raises(ValueError, match='gray.npy.* is not binary'):
    editing.read_mask(str(tmp_path / 'gray.npy'), (8, 8, 3))
  np.save(tmp_path / 'small.npy', np.ones((4, 4)))
  with pytest.raises(ValueError, match=r'small.npy.* has shape \(4, 4, 1\)'):
    editing.read_mask(str(tmp_path / 'small.npy'), (8, 8, 3))


def test_inputs(tmp_path):
  """PNGs are scaled to [-1, 1]; .npy / .npz must be in [-1, 1] and of the run's shape; a missing file is named."""
  Image.fromarray(np.full((8, 8), 255, np.uint8)).save(tmp_path / 'white.png')
  np.testing.assert_array_equal(editing.read_images(str(tmp_path / 'white.png'), (8, 8, 1)), np.ones((1, 8, 8, 1)))
  np.savez(tmp_path / 'two.npz', images=np.zeros((2, 8, 8, 1)))
  assert editing.read_images(str(tmp_path / 'two.npz'), (8, 8, 1)).shape == (2, 8, 8, 1)
  with pytest.raises(ValueError, match=r'holds images of shape \(8, 8, 1\), this run\'s are \(8, 8, 3\)'):
    editing.read_images(str(tmp_path / 'white.png'), (8, 8, 3))
  np.save(tmp_path / 'big.npy', np.full((8, 8, 1), 2.0))
  with pytest.raises(ValueError, match=r'values outside \[-1, 1\]'):
    editing.read_images(str(tmp_path / 'big.npy'), (8, 8, 1))
  with pytest.raises(FileNotFoundError, match='nowhere.png'):
    editing.read_images(str(tmp_path / 'nowhere.png'), (8, 8, 1))


@pytest.mark.parametrize('edit, message', [
    (dict(task='sharpen'), r"edit.task='sharpen'; expected one of \('inpaint', 'colorize'"),
    (dict(num_images=101), r'edit.num_images=101 must be in \[1, 100\]'),
    (dict(task='denoise', sigmas=(1.0,)), r"edit.sigmas=\(1.0,\) is not used by edit.task='denoise'"),
    (dict(task='denoise', noise_sigma=100.0), r'edit.noise_sigma=100.0 must be in \(sigma_min, sigma_max\]'),
    (dict(task='interpolate', input='a.png'), r"edit.task='interpolate' reads no input"),
    (dict(task='interpolate', num_points=1), 'edit.num_points=1 must be at least 2')])
def test_edit_settings(edit, message):
  run = types.SimpleNamespace(source=range(100), process=EDM(sigma_data=SD))  # a run of 100 images
  with pytest.raises(ValueError, match=message):
    editing.check_edit(_edit_config(**edit), run)


def test_diffusion_runs_and_2d_data_are_refused():
  """A diffusion teacher and a 2-D toy run are not pixel-space consistency models on images."""
  config = digits_edm.get_config()
  config.model.update(hidden=16, depth=1)
  with pytest.raises(ValueError, match=r"needs a consistency model; objective.name='edm' is sampled by EDM Heun"):
    editing.check_run(experiment.Experiment(config, jax.devices()[:1]))
  with pytest.raises(ValueError, match=r"edits images; data.name='gmm' holds points of shape \(2,\)"):
    editing.check_run(experiment.Experiment(helpers.tiny_cli_config(), jax.devices()[:1]))


# ----------------------------------------------------------------------------------------------------------
# --mode=edit end to end.
# ----------------------------------------------------------------------------------------------------------
TINY_DIGITS = ['--config=configs/digits_ict.py', '--config.model.hidden=32', '--config.model.depth=1']


def _one_error_line(result, *fragments):
  lines = [line for line in result.stderr.splitlines() if line.startswith('cm_jax: error:')]
  assert result.returncode == 1 and len(lines) == 1, result.stderr[-3000:]
  for fragment in fragments:
    assert fragment in lines[0], lines[0]


@pytest.mark.slow
def test_edit_mode_end_to_end(tmp_path):
  """A 2-step iCT digits run; inpainting a data batch writes the grids and the .npz (known pixels kept) with one
  console line; a wrong-size input and a non-binary mask stop with one error line and exit status 1."""
  workdir = tmp_path / 'run'
  trained = helpers.run_main(*TINY_DIGITS, f'--workdir={workdir}', '--config.train.num_steps=2',
                             '--config.train.batch_size=16', '--config.checkpoint.every_steps=2',
                             '--config.eval.proxy=False', '--config.sampling.num_grid=8')
  assert trained.returncode == 0, trained.stderr[-3000:]
  edit = lambda *args: helpers.run_main(*TINY_DIGITS, f'--workdir={workdir}', '--mode=edit', *args)
  result = edit('--config.edit.num_images=4')
  assert result.returncode == 0, result.stderr[-3000:]
  edits = workdir / 'edits'
  names = ['inpaint_input.png', 'inpaint_reference.png', 'inpaint_result.png', 'inpaint.npz']
  assert result.stdout.splitlines() == [f'Wrote inpaint edits of 4 images (17 levels, sigma 80 to 0.007528) to '
                                        f'{edits}: {", ".join(names)}.']
  assert sorted(p.name for p in edits.iterdir()) == sorted(names)
  arrays = np.load(edits / 'inpaint.npz')
  known = np.ones((8, 8, 1), bool)
  known[2:6, 2:6] = False
  assert arrays['result'].shape == (4, 8, 8, 1)
  np.testing.assert_array_equal(arrays['result'][:, known], arrays['reference'][:, known])
  np.testing.assert_array_equal(arrays['input'][:, ~known], 0.0)
  assert np.asarray(Image.open(edits / 'inpaint_result.png')).shape == (8, 64)  # one row of 8 columns

  Image.fromarray(np.zeros((16, 16), np.uint8)).save(tmp_path / 'big.png')
  _one_error_line(edit(f'--config.edit.input={tmp_path / "big.png"}'), 'big.png', 'shape (16, 16, 1)', '(8, 8, 1)')
  mask = np.zeros((8, 8), np.uint8)
  mask[2:4] = 128
  Image.fromarray(mask).save(tmp_path / 'gray.png')
  _one_error_line(edit(f'--config.edit.mask={tmp_path / "gray.png"}'), 'gray.png', 'is not binary')
  assert sorted(p.name for p in edits.iterdir()) == sorted(names)
