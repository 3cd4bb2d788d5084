"""Streaming FID and Inception Score over the whole mesh (--mode=fid).

  FID = ||mu_g - mu_r||^2 + tr(S_g + S_r - 2 (S_g S_r)^(1/2))           (Heusel et al. 2017)
  IS  = exp(E_x KL(p(y|x) || p(y))), mean and std over 10 splits        (Salimans et al. 2016)

Each global batch is drawn, decoded and embedded on device (every device of every host takes a slice; batch i is
seeded by fold_in(PRNGKey(eval.fid.seed), i), so the samples do not depend on the device count), and only its
moments come back: count, mean and centred scatter of the features, and per IS split the sums of p log p and p.
The host merges them in float64 (Chan, Golub and LeVeque's pairwise update). Any feature network fits the path: the
FID Inception-v3 (evaluation/inception.py) or the digits proxy classifier (evaluation/digits_proxy.py).
"""

import contextlib
import dataclasses
import functools
import json
import os
import re
import time
from typing import Any, Callable, Optional

from etils import epath
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from cm_jax import console
from cm_jax import distributed
from cm_jax import sharding
from cm_jax.evaluation.frechet import frechet_distance

IS_SPLITS = 10


# ----------------------------------------------------------------------------------------------------------
# Feature networks.
# ----------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity: compiled functions are cached per extractor
class Extractor:
  """A feature network: apply(params, images [N, H, W, C] in [-1, 1]) -> (features [N, dim], logits [N, K] or None)."""
  name: str
  params: Any
  apply: Callable
  dim: int


def quantize(images):
  """The uint8 pixels a sample is saved as: floor(127.5 x + 128) clipped to 0..255 (x = u / 127.5 - 1 gives u back)."""
  return jnp.clip(jnp.floor(127.5 * images + 128.0), 0, 255).astype(jnp.uint8)


def inception_extractor(params) -> Extractor:
  """The FID Inception-v3 with `params` (inception.load(path).params) on quantised samples: 2048-d pool features
  and the 1008 logits of the Inception Score."""
  from cm_jax.evaluation import inception  # pylint: disable=g-import-not-at-top

  def apply(params, images):
    out = inception.apply(params, quantize(images))
    return out['pool'], out['logits']

  return Extractor('inception', params, apply, inception.FEATURES)


@functools.lru_cache(maxsize=4)
def digits_extractor(proxy) -> Extractor:
  """The digits proxy classifier (a DigitsProxy) on the samples as they are: 64-d features and its 10 logits."""
  from cm_jax.evaluation import digits_proxy  # pylint: disable=g-import-not-at-top

  def apply(params, images):
    logits, features = digits_proxy.DigitsCNN().apply({'params': params}, images)
    return features, logits

  return Extractor('digits', proxy.params, apply, digits_proxy.DigitsCNN.num_features)


# ----------------------------------------------------------------------------------------------------------
# Moments: per batch on device, merged on the host in float64.
# ----------------------------------------------------------------------------------------------------------
def batch_moments(features, logits, first, total):
  """The moments of one global batch whose samples have indices first + j; those at or past `total` are padding.

  Returns count, mean [F] and centred scatter sum_j (f_j - mean)(f_j - mean)^T [F, F] of the valid features, and per
  IS split s (sample index i is in split floor(i S / total)): the count, sum_i sum_y p log p and sum_i p [S, K].
  """
  index = first + jnp.arange(features.shape[0])
  valid = (index < total).astype(jnp.float32)
  count = valid.sum()
  mean = (valid @ features) / jnp.maximum(count, 1.0)
  centred = (features - mean) * valid[:, None]
  out = {'count': count, 'mean': mean, 'scatter': centred.T @ centred}
  if logits is not None:
    log_p = jax.nn.log_softmax(logits.astype(jnp.float32))
    p = jnp.exp(log_p)
    splits = jax.nn.one_hot(index * IS_SPLITS // total, IS_SPLITS) * valid[:, None]
    out.update(split_count=splits.sum(0), split_plogp=splits.T @ (p * log_p).sum(-1), split_p=splits.T @ p)
  return out


@dataclasses.dataclass
class Moments:
  """Running count, mean and scatter of features (float64), and the Inception Score's per-split sums."""
  count: float = 0.0
  mean: Optional[np.ndarray] = None
  scatter: Optional[np.ndarray] = None
  splits: Optional[dict] = None

  def add(self, batch: dict) -> None:
    """Merges one batch_moments: mean += d n_b / n, scatter += S_b + d d^T n_a n_b / n with d = mean_b - mean."""
    n_b = float(batch['count'])
    if n_b == 0:
      return
    mean_b, scatter_b = (np.asarray(batch[k], np.float64) for k in ('mean', 'scatter'))
    if self.count == 0:
      self.mean, self.scatter = mean_b, scatter_b
    else:
      n = self.count + n_b
      delta = mean_b - self.mean
      self.mean = self.mean + delta * (n_b / n)
      self.scatter = self.scatter + scatter_b + np.outer(delta, delta) * (self.count * n_b / n)
    self.count += n_b
    if 'split_count' in batch:
      sums = {k: np.asarray(batch[k], np.float64) for k in ('split_count', 'split_plogp', 'split_p')}
      self.splits = sums if self.splits is None else {k: self.splits[k] + v for k, v in sums.items()}

  def statistics(self) -> tuple[np.ndarray, np.ndarray]:
    """mu [F] and the unbiased covariance sigma [F, F]."""
    if self.count < 2:
      raise ValueError(f'Need at least 2 samples for feature statistics, have {self.count:.0f}.')
    return self.mean, self.scatter / (self.count - 1)

  def inception_score(self) -> tuple[float, float]:
    """Mean and std over splits of exp(E_i sum_y p log p - sum_y pbar log pbar), pbar the split's mean p."""
    s = self.splits
    n = s['split_count']
    p_bar = s['split_p'] / n[:, None]
    scores = np.exp(s['split_plogp'] / n - (p_bar * np.log(np.maximum(p_bar, 1e-30))).sum(-1))
    return float(scores.mean()), float(scores.std())

  def to_arrays(self) -> dict:
    out = {'count': np.float64(self.count), 'mean': self.mean, 'scatter': self.scatter}
    return dict(out, **(self.splits or {}))

  @classmethod
  def from_arrays(cls, arrays) -> 'Moments':
    splits = {k: arrays[k] for k in ('split_count', 'split_plogp', 'split_p') if k in arrays}
    return cls(float(arrays['count']), arrays['mean'], arrays['scatter'], splits or None)


# ----------------------------------------------------------------------------------------------------------
# The streaming loop.
# ----------------------------------------------------------------------------------------------------------
def _save_npz(path: epath.Path, arrays: dict) -> None:
  """Writes arrays to `path` whole or not at all (a temporary file renamed over it); process 0 only."""
  if jax.process_index() != 0:
    return
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.parent / (path.name + '.tmp')
  with tmp.open('wb') as f:
    np.savez(f, **arrays)
  os.replace(tmp, path)


def _stream(batch_fn, num_batches: int, progress_path: Optional[epath.Path], fingerprint: str, save_every: int,
            what: Optional[str]) -> Moments:
  """Moments of batch_fn(0), ..., batch_fn(num_batches - 1), continuing from `progress_path` when it holds the
  same `fingerprint`; the partial moments are saved there every `save_every` batches and at a SIGTERM. Progress
  lines with the ETA name `what` (None: silent)."""
  moments, start = Moments(), 0
  if progress_path is not None and progress_path.exists():
    with progress_path.open('rb') as f:
      saved = dict(np.load(f))
    if str(saved.pop('fingerprint')) == fingerprint:
      start = int(saved.pop('done'))
      moments = Moments.from_arrays(saved)
      console.say(f'{what}: continuing after batch {start}/{num_batches} ({progress_path}).')
  start = int(multihost_utils.broadcast_one_to_all(np.int32(start)))  # process 0 holds the file

  def save(done):
    if progress_path is not None:
      _save_npz(progress_path, dict(moments.to_arrays(), done=np.int64(done), fingerprint=np.str_(fingerprint)))

  every = console.console_every(num_batches, 1)
  begin = time.monotonic()
  # Without a progress file there is nothing to save: a SIGTERM stops the process at once (stop_on_sigterm).
  with distributed.PreemptionWatch() if progress_path is not None else contextlib.nullcontext() as preemption:
    for i in range(start, num_batches):
      moments.add(jax.device_get(batch_fn(i)))
      done = i + 1
      if preemption is not None and preemption.reached(done):
        save(done)
        raise distributed.Preempted(f'Preempted: {what} saved after batch {done}/{num_batches} to {progress_path}; '
                                    'run the same command again to continue.')
      if done % save_every == 0:
        save(done)
      if what and (done % every == 0 or done == num_batches):
        rate = (done - start) / max(time.monotonic() - begin, 1e-9)
        console.say(f'{what}: batch {done}/{num_batches}  {rate:.2f} batches/s  ETA '
                    f'{console.format_seconds((num_batches - done) / max(rate, 1e-9))}')
  if progress_path is not None and jax.process_index() == 0 and progress_path.exists():
    progress_path.unlink()
  return moments


@functools.lru_cache(maxsize=16)
def _sample_moments_fn(exp, extractor: Extractor, batch: int, num_steps: int):
  """generated_moments' jitted batch, compiled once per (run, feature network, batch, step count)."""
  def fn(params, space_params, extractor_params, rng, first, total, text):
    images = exp.draw(params, space_params, rng, batch, num_steps, text)
    return batch_moments(*extractor.apply(extractor_params, images), first, total)
  return jax.jit(fn, out_shardings=sharding.replicated(exp.mesh))


def generated_moments(exp, params, extractor: Extractor, num: int, num_steps: int, seed: int, batch: int,
                      progress_path=None, save_every: int = 0, teacher_params=None, what=None) -> Moments:
  """Moments of the features of `num` samples of `params` (exp's sampler at `num_steps`; teacher_params for LoRA),
  with progress lines naming `what` when given."""
  params = exp.objective.sample_params(params, {'teacher': teacher_params})
  extractor_params = jax.device_put(extractor.params, sharding.replicated(exp.mesh))
  fn = _sample_moments_fn(exp, extractor, batch, num_steps)
  key = jax.random.PRNGKey(seed)
  fingerprint = json.dumps([extractor.name, num, num_steps, seed, batch])
  text = exp.prompt_batches(-(-num // batch), batch)  # a text-to-image run's prompts, batch by batch
  return _stream(
      lambda i: fn(params, exp.space.params, extractor_params, jax.random.fold_in(key, i), i * batch, num, text(i)),
      -(-num // batch), progress_path, fingerprint, save_every or -(-num // batch), what)


def data_moments(source, extractor: Extractor, num: int, batch: int, mesh, workers: int = 0) -> Moments:
  """Moments of the features of `num` records of a data source (each read once, in a fixed order; decoded by
  `workers` processes, as data.workers)."""
  from cm_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from cm_jax.data import source as source_lib  # pylint: disable=g-import-not-at-top
  fn = jax.jit(lambda params, images, first: batch_moments(*extractor.apply(params, source_lib.to_model_range(images)),
                                                          first, num),
               out_shardings=sharding.replicated(mesh))
  params = jax.device_put(extractor.params, sharding.replicated(mesh))
  with pipeline.BatchIterator(source, batch, 0, 0, sharding.batch_sharding(mesh), workers=workers) as batches:
    return _stream(lambda i: fn(params, next(batches)['image'], i * batch), -(-num // batch), None, '',
                   -(-num // batch), 'reference statistics')


# ----------------------------------------------------------------------------------------------------------
# --mode=fid
# ----------------------------------------------------------------------------------------------------------
def check_fid_config(config) -> None:
  """eval.fid's values, before any weights are read or samples drawn."""
  f = config.eval.fid
  if f.extractor not in ('inception', 'digits'):
    raise ValueError(f"eval.fid.extractor={f.extractor!r}; expected 'inception' or 'digits'.")
  if f.num_samples < 2 or f.batch_size < 0 or f.save_every < 1:
    raise ValueError(f'eval.fid.num_samples={f.num_samples} must be at least 2, eval.fid.batch_size={f.batch_size} '
                     f'at least 0 (0: train.batch_size) and eval.fid.save_every={f.save_every} at least 1.')
  if f.extractor == 'inception' and not f.inception_weights:
    from cm_jax.evaluation import inception  # pylint: disable=g-import-not-at-top
    raise ValueError(f'eval.fid.inception_weights is empty: set it to the local path of {inception.WEIGHTS_FILE} '
                     f'(download it once from {inception.WEIGHTS_URL}).')


def make_extractor(config, workdir) -> Extractor:
  """eval.fid.extractor with its weights: the Inception file, or the run's cached digits proxy classifier."""
  if config.eval.fid.extractor == 'inception':
    from cm_jax.evaluation import inception  # pylint: disable=g-import-not-at-top
    return inception_extractor(inception.load(config.eval.fid.inception_weights).params)
  from cm_jax.evaluation import report  # pylint: disable=g-import-not-at-top
  return digits_extractor(report.load_or_train_proxy(epath.Path(workdir) / 'proxy_classifier.msgpack'))


def check_images(extractor: Extractor, shape) -> None:
  """The run's decoded samples must be images the extractor reads."""
  if extractor.name == 'digits' and tuple(shape) != (8, 8, 1):
    raise ValueError(f'eval.fid.extractor=digits reads 8x8x1 digits; this run makes {shape} samples.')
  if len(shape) != 3 or shape[-1] not in (1, 3):
    raise ValueError(f'FID needs images [H, W, 1 or 3]; this run makes samples of shape {shape}.')


def reference_statistics(config, workdir, extractor: Extractor, mesh, batch: int):
  """(mu, sigma, count, path) of the reference: eval.fid.reference if it exists, else computed from config.data's
  eval.fid.reference_split and written there (default WORKDIR/fid/reference_<extractor>_<data>_<split>.npz)."""
  f = config.eval.fid
  path = epath.Path(f.reference or epath.Path(workdir) / 'fid' / re.sub(
      r'[^A-Za-z0-9_.-]+', '_', f'reference_{extractor.name}_{config.data.name}_{f.reference_split}.npz'))
  if path.exists():
    try:
      with path.open('rb') as fh:
        arrays = dict(np.load(fh))
      mu, sigma = np.asarray(arrays['mu'], np.float64), np.asarray(arrays['sigma'], np.float64)
    except Exception as e:  # a truncated file, another format, no mu / sigma
      raise ValueError(f'Cannot read reference statistics (mu, sigma) from {path}: {e}') from None
    if mu.shape != (extractor.dim,) or sigma.shape != (extractor.dim, extractor.dim):
      raise ValueError(f'Reference statistics {path} have mu {mu.shape} and sigma {sigma.shape}; the {extractor.name} '
                       f'extractor gives {extractor.dim} features: use statistics of the same network.')
    bad = [name for name, value in (('mu', mu), ('sigma', sigma)) if not np.all(np.isfinite(value))]
    if bad:
      raise ValueError(f'Reference statistics {path} hold NaN or inf in {" and ".join(bad)}: compute them again (delete '
                       'the file, and --mode=fid writes them from eval.fid.reference_split) or give other ones.')
    return mu, sigma, int(arrays.get('count', 0)), path
  from cm_jax.data import build  # pylint: disable=g-import-not-at-top
  data = config.data.copy_and_resolve_references()
  data.split = f.reference_split
  source = build.build_source(data)
  check_images(extractor, source.shape)
  moments = data_moments(source, extractor, len(source), batch, mesh, data.workers)
  mu, sigma = moments.statistics()
  _save_npz(path, {'mu': mu, 'sigma': sigma, 'count': np.int64(len(source)), 'extractor': np.str_(extractor.name)})
  console.say(f'Reference statistics of {config.data.name} {f.reference_split} ({len(source)} images) written to '
              f'{path}.')
  return mu, sigma, len(source), path


def write_report(workdir, report: dict) -> None:
  """Writes WORKDIR/fid.json (process 0). JSON has no NaN: a score that is not finite stops the run instead, naming
  the sampler and the checkpoint, and nothing is written."""
  bad = [label for label, r in report['results'].items()
         if not all(np.isfinite(v) for v in r.values() if isinstance(v, float))]
  path = epath.Path(workdir) / 'fid.json'
  if bad:
    raise FloatingPointError(f'The scores of {", ".join(bad)} are not finite (NaN or inf): the samples of the '
                             f'checkpoint at step {report["checkpoint_step"]} are; nothing is written to {path}.')
  if jax.process_index() == 0:
    path.write_text(json.dumps(report, indent=2, allow_nan=False))


def run(config, workdir, devices=None):
  """--mode=fid: FID (and the Inception Score) of the newest checkpoint's first EMA at each of the sampler's step
  counts; writes WORKDIR/fid.json and TensorBoard scalars fid/<n>_step, inception_score/<n>_step."""
  from cm_jax import experiment  # pylint: disable=g-import-not-at-top
  from cm_jax import writers  # pylint: disable=g-import-not-at-top
  f = config.eval.fid
  check_fid_config(config)
  extractor = make_extractor(config, workdir)
  exp, state = experiment.restore_latest(config, workdir, devices)
  batch = f.batch_size or config.train.batch_size
  sharding.check_batch_divides(batch, exp.mesh)
  decoded = jax.eval_shape(exp.space.decode, exp.space.params, jax.ShapeDtypeStruct((1,) + exp.shape, jnp.float32))
  check_images(extractor, decoded.shape[1:])
  teacher = experiment.load_teacher(config, exp, required=bool(config.lora.rank))  # LoRA samples with its teacher
  from cm_jax.evaluation import clip_score  # pylint: disable=g-import-not-at-top
  scorer = clip_score.make_scorer(config, exp)  # eval.clip.model: a text-to-image run's CLIP score beside FID
  mu, sigma, count, reference = reference_statistics(config, workdir, extractor, exp.mesh, batch)
  step = int(state.step)
  results = {}
  for n in exp.sampler.eval_steps(config):
    label = exp.sampler.label(n)
    moments = generated_moments(
        exp, state.ema[0], extractor, f.num_samples, n, f.seed, batch,
        epath.Path(workdir) / 'fid' / f'progress_{n}_step.npz', f.save_every,
        None if teacher is None else teacher.params, what=f'FID {label}')
    row = {'num_steps': n, 'nfe': exp.sampler.nfe(config, n), 'fid': frechet_distance(*moments.statistics(), mu, sigma)}
    if moments.splits is not None:
      row['inception_score'], row['inception_score_std'] = moments.inception_score()
    row.update(clip_score.fid_row(config, workdir, exp, scorer, state.ema[0], n, batch,
                                  None if teacher is None else teacher.params, label))
    results[label] = row
  report = {'checkpoint_step': step, 'extractor': extractor.name, 'num_samples': int(f.num_samples),
            'reference': {'path': str(reference), 'count': count}, 'results': results}
  lines = [f'FID ({extractor.name} features, {f.num_samples} samples against {reference}, {count} images)',
           '| sampler | NFE | FID | IS |', '|---|---|---|---|']
  lines += [f'| {label} | {r["nfe"]} | {r["fid"]:.3f} | {r.get("inception_score", float("nan")):.3f} |'
            for label, r in results.items()]
  console.say('\n'.join(lines))
  write_report(workdir, report)
  writer = writers.make_writers(config, workdir)
  tag = lambda label: re.sub(r'[^A-Za-z0-9]+', '_', label).strip('_')
  writer.write_scalars(step, {f'fid/{tag(k)}': r['fid'] for k, r in results.items()})
  writer.write_scalars(step, {f'inception_score/{tag(k)}': r['inception_score'] for k, r in results.items()
                              if 'inception_score' in r})
  writer.write_scalars(step, {f'clip_score/{tag(k)}': r['clip_score'] for k, r in results.items() if 'clip_score' in r})
  writer.close()
  return report
