"""Zero-shot editing with a consistency model (CM paper, Algorithm 4; reference section 6).

An edit keeps the coefficients (A y)(1 - Omega) of a reference image y under an orthogonal transform A (an
(apply, inverse) pair, inverse = A^T) and generates the rest (Omega = 1) with multistep consistency sampling:

  y <- A^-1[(A y)(1 - Omega)];  x <- y
  for each level t_n, first to last:  x <- f(renoise(x, z_n, t_n), t_n);  x <- A^-1[(A y)(1 - Omega) + (A x) Omega]

renoise is the process's own (EDM: x + sqrt(t^2 - eps^2) z; TrigFlow: cos(t) x + sin(t) sd z), at the first level
too: Algorithm 4 draws x ~ N(y, t_1^2 I), which differs from y + sqrt(t_1^2 - eps^2) z by under 1e-6 relative for
t_1 >= 2. f is clamped to [-1, 1] with sampling.clip_denoised, before the projection. The tasks (config.edit.task):

  inpaint        A = I, Omega = a mask of pixels ('center', 'box' or a file).
  colorize       per pixel a 3x3 orthogonal Q whose first column is along the luma weights: Omega = the two others.
  super_resolve  per channel and p x p patch a p^2 x p^2 orthogonal Q whose first column is uniform: Omega = all but
                 the patch mean.
  stroke         SDEdit-style stroke-guided generation: A = I, Omega = 1, the loop starts from the strokes.
  denoise        x = f(y, sigma) for an input y at the known noise level sigma.
  interpolate    x = f(T z, T) along the spherical interpolation z of two noises z1, z2.

`edit`, `denoise` and `interpolate` are pure and jittable; `run` is --mode=edit.
"""

import dataclasses
import io
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from PIL import Image
from PIL import UnidentifiedImageError

from cm_jax import console
from cm_jax import experiment
from cm_jax import sampling
from cm_jax import schedules
from cm_jax import sharding
from cm_jax import writers
from cm_jax.data import image_folder
from cm_jax.data import source as source_lib
from cm_jax.models.apply import network

Transform = tuple[Callable, Callable]  # (apply: x -> A x, inverse: c -> A^-1 c = A^T c)

TASKS = ('inpaint', 'colorize', 'super_resolve', 'stroke', 'denoise', 'interpolate')
LUMA = (0.2989, 0.5870, 0.1140)
STROKE_SIGMAS = (5.38, 2.24)  # CM paper: stroke-guided generation starts at t1 = 5.38, then t2 = 2.24
IDENTITY: Transform = (lambda x: x, lambda c: c)


# ----------------------------------------------------------------------------------------------------------
# Transforms and the editing loop.
# ----------------------------------------------------------------------------------------------------------
def householder(v) -> np.ndarray:
  """Q = I - 2 u u^T / (u^T u), u = e_1 - v / |v|: symmetric, orthogonal, first column v / |v| (Q = I if v ~ e_1)."""
  v = np.asarray(v, np.float64) / np.linalg.norm(v)
  u = np.eye(len(v))[0] - v
  if not np.any(u):
    return np.eye(len(v))
  return np.eye(len(v)) - 2.0 * np.outer(u, u) / (u @ u)


def colour_transform() -> Transform:
  """Per pixel c = Q^T x with Q = householder(LUMA): c_0 = (0.2989 r + 0.5870 g + 0.1140 b) / |w|, the luma."""
  q = jnp.asarray(householder(LUMA), jnp.float32)
  return (lambda x: x @ q, lambda c: c @ q.T)


def patch_transform(p: int) -> Transform:
  """Per channel and p x p patch c = Q^T x_patch with Q = householder(1): c_0 = p * (patch mean); coefficients
  [B, H/p, W/p, p^2, C]."""
  q = jnp.asarray(householder(np.ones(p * p)), jnp.float32)

  def apply(x):
    b, h, w, ch = x.shape
    patches = x.reshape(b, h // p, p, w // p, p, ch).transpose(0, 1, 3, 2, 4, 5).reshape(b, h // p, w // p, p * p, ch)
    return jnp.einsum('bijkc,kl->bijlc', patches, q)

  def inverse(c):
    b, hp, wp, _, ch = c.shape
    patches = jnp.einsum('bijlc,kl->bijkc', c, q)
    return patches.reshape(b, hp, wp, p, p, ch).transpose(0, 1, 3, 2, 4, 5).reshape(b, hp * p, wp * p, ch)

  return apply, inverse


def patch_mask(p: int) -> np.ndarray:
  """Omega of patch_transform: 0 for the patch mean c_0, 1 for the other p^2 - 1 coefficients ([p^2, 1])."""
  return np.concatenate([[0.0], np.ones(p * p - 1)]).astype(np.float32)[:, None]


def project(transform: Transform, mask, y, x):
  """A^-1[(A y)(1 - Omega) + (A x) Omega]: x's generated coefficients with y's kept ones."""
  apply, inverse = transform
  return inverse(apply(y) * (1.0 - mask) + apply(x) * mask)


def edit(process, f, y, transform: Transform, mask, ts, rng, start=None):
  """Algorithm 4: x <- A^-1[(A y)(1 - Omega)]; per level t_n: x <- f(renoise(x, z_n, t_n), t_n), project(y, x).

  y [B, ...]: the reference; mask: Omega, broadcast against A y (1 = generate); ts: the decreasing levels in the
  process's time (t_from_sigma of EDM levels); z_n = N(0, I) drawn from fold_in(rng, n); start: where the loop starts
  instead of A^-1[(A y)(1 - Omega)] (stroke guidance starts from the strokes). f(x, t) takes per-sample t [B].
  """
  x = project(transform, mask, y, jnp.zeros_like(y)) if start is None else start

  def level(x, n_t):
    n, t = n_t
    t = jnp.full((y.shape[0],), t)
    z = jax.random.normal(jax.random.fold_in(rng, n), y.shape)
    return project(transform, mask, y, f(process.renoise(x, z, t), t)), None

  x, _ = jax.lax.scan(level, x, (jnp.arange(len(ts)), jnp.asarray(ts, jnp.float32)))
  return x


def denoise(process, f, y, sigma: float):
  """x = f(y, sigma) for y = x0 + sigma z, in the process's variables: f(x_from_sigma(y, sigma), t_from_sigma(sigma))
  (TrigFlow: f(cos(t) y, t), t = arctan(sigma / sd))."""
  s = jnp.full((y.shape[0],), sigma, jnp.float32)
  return f(process.x_from_sigma(y, s), process.t_from_sigma(s))


def slerp(z1, z2, alpha):
  """z = sin((1 - a) theta) / sin(theta) z1 + sin(a theta) / sin(theta) z2, cos(theta) = <z1, z2> / (|z1| |z2|):
  [B, P, ...] for pairs z1, z2 [B, ...] and points a [P]."""
  flat = lambda z: z.reshape(z.shape[0], -1)
  cos = jnp.sum(flat(z1) * flat(z2), -1) / (jnp.linalg.norm(flat(z1), axis=-1) * jnp.linalg.norm(flat(z2), axis=-1))
  theta = jnp.arccos(jnp.clip(cos, -1.0, 1.0))[:, None]
  w1, w2 = (jnp.sin(a * theta) / jnp.sin(theta) for a in (1.0 - alpha, alpha))
  expand = lambda w: w.reshape(w.shape + (1,) * (z1.ndim - 1))
  return expand(w1) * z1[:, None] + expand(w2) * z2[:, None]


def interpolate(process, f, z1, z2, num_points: int):
  """x = f(prior(z), t_max) for z = slerp(z1, z2, a), a = 0, 1/(P-1), ..., 1: [B, P, ...]; f sees B P samples."""
  z = slerp(z1, z2, jnp.linspace(0.0, 1.0, num_points))
  flat = z.reshape((-1,) + z.shape[2:])
  x = f(process.prior(flat), jnp.full((flat.shape[0],), process.t_max, jnp.float32))
  return x.reshape(z.shape)


# ----------------------------------------------------------------------------------------------------------
# --mode=edit: inputs, checks and outputs.
# ----------------------------------------------------------------------------------------------------------
_UNREADABLE = (OSError, ValueError, SyntaxError, EOFError)  # what PIL and numpy raise on a file of another kind


def _read_array(path) -> np.ndarray:
  """A PNG / JPEG as uint8 [H, W(, C)], or the array of an .npy / .npz (its only array, or 'images'); a file that is
  none of these is named."""
  path = epath.Path(path)
  if not path.exists():
    raise FileNotFoundError(f'{path} does not exist.')
  data = path.read_bytes()
  arrays = path.suffix in ('.npy', '.npz')
  try:
    loaded = np.load(io.BytesIO(data)) if arrays else Image.open(io.BytesIO(data))
    if not arrays:
      loaded.load()  # decoded here, so that a truncated file is named too
  except _UNREADABLE as e:
    reason = 'PIL does not know its format' if isinstance(e, UnidentifiedImageError) else f'{type(e).__name__}: {e}'
    raise ValueError(f'{path} is not a readable {path.suffix if arrays else "image"} file ({reason}): give a PNG / '
                     'JPEG, or an .npy / .npz of images in [-1, 1].') from e
  if path.suffix == '.npz':
    if len(loaded.files) != 1 and 'images' not in loaded.files:
      raise ValueError(f'{path} holds arrays {loaded.files}: name the images "images" (or store only them).')
    return loaded['images' if 'images' in loaded.files else loaded.files[0]]
  if arrays:
    return loaded
  return np.asarray(loaded.convert('RGB') if loaded.mode == 'P' else loaded)  # a palette PNG as its colours


def _read_folder(folder: epath.Path, shape: tuple) -> np.ndarray:
  """The images of a folder's PNG / JPEG files (sorted by name) as [N, *shape] in [-1, 1]."""
  files = sorted(p for p in folder.iterdir() if p.suffix.lower() in image_folder.IMAGE_SUFFIXES)
  if not files:
    raise ValueError(f'edit.input={str(folder)!r} is a folder without {"/".join(image_folder.IMAGE_SUFFIXES)} images: '
                     'give one image file, an .npy / .npz, or a folder of images.')
  return np.concatenate([read_images(str(f), shape) for f in files])


def read_images(path, shape: tuple) -> np.ndarray:
  """config.edit.input as images [N, *shape] in [-1, 1]: a PNG / JPEG (0..255 scaled), an .npy / .npz in [-1, 1], or
  a folder of PNG / JPEG files (each one image)."""
  if epath.Path(path).is_dir():
    return _read_folder(epath.Path(path), shape)
  images = _read_array(path)
  if images.dtype == np.uint8:
    images = source_lib.to_model_range(images)
  elif not np.issubdtype(images.dtype, np.number) or not np.all(np.isfinite(images)):
    raise ValueError(f'edit.input={path!r} holds values that are not finite numbers (NaN or inf; {images.dtype}): '
                     'give images in [-1, 1] or a PNG.')
  elif not np.all(np.abs(images) <= 1.0):
    raise ValueError(f'edit.input={path!r} holds values outside [-1, 1]: scale the images to [-1, 1] or give a PNG.')
  if images.ndim == 2:  # a grayscale PNG
    images = images[..., None]
  if images.ndim == 3:
    images = images[None]
  if images.shape[1:] != tuple(shape):
    raise ValueError(f'edit.input={path!r} holds images of shape {images.shape[1:]}, this run\'s are {tuple(shape)} '
                     '(height, width, channels): resize or convert the input.')
  return images.astype(np.float32)


def read_mask(path, shape: tuple) -> np.ndarray:
  """A binary inpainting mask file (1 = generate) as [H, W, 1] or [H, W, C]: a PNG of 0 / 255 or an .npy of 0 / 1."""
  mask = _read_array(path)
  top = 255 if mask.dtype == np.uint8 and path.lower().endswith(('.png', '.jpg', '.jpeg')) else 1
  if not np.all((mask == 0) | (mask == top)):
    raise ValueError(f'edit.mask={path!r} is not binary (values other than 0 and {top}): save it with only 0 '
                     f'(keep) and {top} (generate).')
  mask = mask.astype(np.float32) / top
  mask = mask[..., None] if mask.ndim == 2 else mask
  if mask.shape[:2] != tuple(shape[:2]) or mask.shape[2] not in (1, shape[2]):
    raise ValueError(f'edit.mask={path!r} has shape {mask.shape}; this run\'s images need {tuple(shape[:2])} or '
                     f'{tuple(shape)}.')
  return mask


def inpaint_mask(e, shape: tuple) -> np.ndarray:
  """edit.mask as Omega [H, W, 1 or C]: 'center' (the middle half of each side), 'box' (edit.box) or a file."""
  h, w, _ = shape
  if e.mask not in ('center', 'box'):
    return read_mask(e.mask, shape)
  top, left, height, width = (h // 4, w // 4, h // 2, w // 2) if e.mask == 'center' else tuple(e.box)
  if min(height, width) < 1 or top < 0 or left < 0 or top + height > h or left + width > w:
    raise ValueError(f'edit.box={tuple(e.box)} must be (top, left, height, width) of a non-empty box inside the '
                     f'{h}x{w} image.')
  mask = np.zeros((h, w, 1), np.float32)
  mask[top:top + height, left:left + width] = 1.0
  return mask


def _patch_size(e, shape: tuple) -> int:
  p = int(e.patch_size)
  if p < 1 or shape[0] % p or shape[1] % p:
    raise ValueError(f'edit.patch_size={p} does not divide the {shape[0]}x{shape[1]} images: choose a divisor of both.')
  return p


def problem(e, shape: tuple) -> tuple[Transform, np.ndarray]:
  """(A, Omega) of an Algorithm-4 task (inpaint, colorize, super_resolve, stroke) for images of `shape`."""
  if e.task == 'inpaint':
    return IDENTITY, inpaint_mask(e, shape)
  if e.task == 'colorize':
    if shape[2] != 3:
      raise ValueError(f'edit.task=\'colorize\' needs RGB images; this run\'s have {shape[2]} channel(s).')
    return colour_transform(), np.array([0.0, 1.0, 1.0], np.float32)
  if e.task == 'super_resolve':
    p = _patch_size(e, shape)
    return patch_transform(p), patch_mask(p)
  return IDENTITY, np.ones(shape, np.float32)


def levels(config, process) -> tuple:
  """The loop's EDM levels: edit.sigmas, else the task's default (stroke: (5.38, 2.24); otherwise the
  edit.grid_size-point Karras grid from sigma_max down, without sigma_min)."""
  e = config.edit
  if e.sigmas:
    sigmas = tuple(float(s) for s in e.sigmas)
    if not all(process.sigma_min < s <= process.sigma_max for s in sigmas) or any(
        a <= b for a, b in zip(sigmas, sigmas[1:])):
      raise ValueError(f'edit.sigmas={sigmas} must decrease strictly inside (sigma_min, sigma_max] = '
                       f'({process.sigma_min}, {process.sigma_max}].')
    return sigmas
  if e.task == 'stroke':
    return STROKE_SIGMAS
  if e.grid_size < 2:
    raise ValueError(f'edit.grid_size={e.grid_size} must be at least 2.')
  grid = schedules.karras_sigmas(e.grid_size, process.sigma_min, process.sigma_max, config.parameterization.rho)
  return tuple(float(s) for s in np.asarray(grid)[:0:-1])


def check_run(exp) -> None:
  """--mode=edit needs a pixel-space consistency model on images."""
  c = exp.config
  if exp.space.describe()['space'] != 'pixels':
    raise ValueError(f'--mode=edit edits pixels, but this run samples latents (latent.autoencoder='
                     f'{c.latent.autoencoder!r}): edit a pixel-space consistency model.')
  if exp.sampler is not sampling.CONSISTENCY:
    raise ValueError(f'--mode=edit needs a consistency model; objective.name={c.objective.name!r} is sampled by '
                     f'{exp.sampler.label(c.sampling.teacher_steps)}: edit a cd, ct, ict, ect, sct or scd run.')
  if len(exp.shape) != 3:
    raise ValueError(f'--mode=edit edits images; data.name={c.data.name!r} holds points of shape {exp.shape}.')


def check_edit(config, exp) -> None:
  """The edit settings that need no file: task, counts, and settings another task would silently ignore."""
  e = config.edit
  if e.task not in TASKS:
    raise ValueError(f'edit.task={e.task!r}; expected one of {TASKS}.')
  if e.num_images < 1 or (not e.input and e.task != 'interpolate' and e.num_images > len(exp.source)):
    raise ValueError(f'edit.num_images={e.num_images} must be in [1, {len(exp.source)}] (the images of '
                     f'data.name={config.data.name!r}).')
  if e.task in ('denoise', 'interpolate') and e.sigmas:
    raise ValueError(f'edit.sigmas={tuple(e.sigmas)} is not used by edit.task={e.task!r} (one step, at '
                     f'{"edit.noise_sigma" if e.task == "denoise" else "sigma_max"}): leave it empty.')
  if e.task == 'interpolate' and e.input:
    raise ValueError(f'edit.task=\'interpolate\' reads no input (edit.input={e.input!r}): it interpolates noises.')
  if e.task == 'interpolate' and e.num_points < 2:
    raise ValueError(f'edit.num_points={e.num_points} must be at least 2.')
  p = exp.process
  if e.task == 'denoise' and not p.sigma_min < e.noise_sigma <= p.sigma_max:
    raise ValueError(f'edit.noise_sigma={e.noise_sigma} must be in (sigma_min, sigma_max] = ({p.sigma_min}, '
                     f'{p.sigma_max}].')


def _net_fn(exp, params, cond, batch: int):
  """f(x, t) of the run's network, its labels and guidance scale bound, clamped with sampling.clip_denoised."""
  guidance = jnp.full((batch,), float(exp.config.sampling.guidance_scale), jnp.float32)
  return sampling.consistency_fn(exp.process, network(exp.model, params, cond, guidance=guidance),
                                 sampling.clip_denoised(exp.config))


@dataclasses.dataclass(frozen=True)
class Job:
  """One edit, checked and ready: compute(f, **args) -> result, with f seeing `batch` samples labelled `labels`;
  `shown`: the input (what the edit keeps) and the reference, as images [N, H, W, C]."""
  sigmas: tuple
  compute: Callable
  args: dict
  batch: int
  labels: Optional[np.ndarray]
  shown: dict


def prepare(config, exp, rng) -> Job:
  """config.edit as a Job, every input read and checked (nothing is sampled yet)."""
  e, process, shape = config.edit, exp.process, exp.shape
  labels = None
  if e.task == 'interpolate':
    z1, z2 = (np.asarray(jax.random.normal(jax.random.fold_in(rng, 3 + k), (e.num_images,) + shape)) for k in (0, 1))
    compute = lambda f, z1, z2: interpolate(process, f, z1, z2, e.num_points)
    if exp.num_classes > 0:  # one class per pair
      labels = np.repeat(_random_labels(exp, rng, e.num_images), e.num_points)
    return Job((process.sigma_max,), compute, {'z1': z1, 'z2': z2}, e.num_images * e.num_points, labels, {})
  if e.input:
    images = read_images(e.input, shape)
  else:
    batch = exp.source.get(np.arange(e.num_images))
    images, labels = source_lib.to_model_range(batch['image']), batch['label']
  if exp.num_classes == 0:
    labels = None
  elif labels is None:
    labels = _random_labels(exp, rng, len(images))
  if e.task == 'denoise':
    noisy = images
    if not e.input:  # data images get noise at the level the edit removes
      noisy = images + e.noise_sigma * np.asarray(jax.random.normal(jax.random.fold_in(rng, 1), images.shape))
    compute = lambda f, y: denoise(process, f, y, e.noise_sigma)
    return Job((float(e.noise_sigma),), compute, {'y': noisy}, len(images), labels,
               {'input': noisy, 'reference': images})
  transform, mask = problem(e, shape)
  sigmas = levels(config, process)
  ts = np.asarray([float(process.t_from_sigma(s)) for s in sigmas], np.float32)
  compute = lambda f, y, start=None: edit(process, f, y, transform, mask, ts, jax.random.fold_in(rng, 0), start)
  if e.task != 'stroke':
    kept = np.asarray(project(transform, mask, images, np.zeros_like(images)))
    return Job(sigmas, compute, {'y': images}, len(images), labels, {'input': kept, 'reference': images})
  strokes = images
  if not e.input:  # data images made into coarse strokes: their p x p patch means
    p = _patch_size(e, shape)
    strokes = np.asarray(project(patch_transform(p), patch_mask(p), images, np.zeros_like(images)))
  return Job(sigmas, compute, {'y': strokes, 'start': strokes}, len(images), labels,
             {'input': strokes, 'reference': images})


def _random_labels(exp, rng, n: int) -> np.ndarray:
  """Classes for a conditional network's edits of inputs without labels (files, noises)."""
  return np.asarray(jax.random.randint(jax.random.fold_in(rng, 2), (n,), 0, exp.num_classes))


def run(config, workdir: str, devices=None):
  """--mode=edit: config.edit.task on config.edit.input (or images of config.data) with the newest checkpoint's first
  EMA; writes WORKDIR/edits/<task>_{input,reference,result}.png and <task>.npz and says so in one line."""
  exp, state = experiment.restore_latest(config, workdir, devices)
  check_run(exp)
  check_edit(config, exp)
  e = config.edit
  job = prepare(config, exp, jax.random.PRNGKey(config.seed))
  teacher = experiment.load_teacher(config, exp, required=True) if config.lora.rank else None  # LoRA: on its teacher
  params = exp.objective.sample_params(state.ema[0], {'teacher': None if teacher is None else teacher.params})
  replicated = sharding.replicated(exp.mesh)

  def compute(params, cond, args):
    with jax.sharding.use_abstract_mesh(exp.mesh.abstract_mesh):  # what per-device kernels shard by
      return job.compute(_net_fn(exp, params, cond, job.batch), **args)

  fn = jax.jit(compute, out_shardings=replicated)
  cond = None if job.labels is None else jax.device_put(jnp.asarray(job.labels, jnp.int32), replicated)
  result = np.asarray(fn(params, cond, jax.device_put(job.args, replicated)))

  out = epath.Path(workdir) / 'edits'
  arrays = dict(job.shown, result=result)
  columns = e.num_points if e.task == 'interpolate' else 8
  for k, images in arrays.items():
    writers.save_png(out / f'{e.task}_{k}.png', writers.image_grid(images.reshape((-1,) + exp.shape), columns))
  if jax.process_index() == 0:
    with (out / f'{e.task}.npz').open('wb') as f:
      np.savez(f, sigmas=np.asarray(job.sigmas), **arrays)
  names = [f'{e.task}_{k}.png' for k in arrays] + [f'{e.task}.npz']
  sigmas = job.sigmas
  where = f'sigma {sigmas[0]:.4g}' + (f' to {sigmas[-1]:.4g}' if len(sigmas) > 1 else '')
  console.say(f'Wrote {e.task} edits of {len(result)} {"noise pairs" if e.task == "interpolate" else "images"} '
              f'({len(sigmas)} level{"s" if len(sigmas) > 1 else ""}, {where}) to {out}: {", ".join(names)}.')
  return result
