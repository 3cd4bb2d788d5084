"""The small-data quality table: digits-proxy Frechet distance of each model's samples."""

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from cm_jax.data import captions

from cm_jax.evaluation import fid
from cm_jax.evaluation import digits_proxy
from cm_jax.evaluation.digits_proxy import DigitsProxy
from cm_jax.evaluation.frechet import frechet_distance


def load_or_train_proxy(path) -> DigitsProxy:
  """The proxy classifier cached at `path`, trained (and cached) on first use."""
  if path.exists():
    return DigitsProxy.load(path)
  proxy = DigitsProxy.train(seed=0)
  if jax.process_index() == 0:
    proxy.save(path)
  return proxy


def proxy_frechet(proxy: DigitsProxy, exp, params, num: int, num_steps: int, seed: int, teacher_params=None) -> float:
  """FD to the held-out digits of `num` samples of `params` (exp's sampler at `num_steps`), streamed through the
  proxy classifier on the mesh like FID (evaluation/fid.py)."""
  moments = fid.generated_moments(exp, params, fid.digits_extractor(proxy), num, num_steps, seed,
                                  exp.config.train.batch_size, teacher_params=teacher_params)
  return frechet_distance(*moments.statistics(), *proxy.reference)


def caption_agreement(proxy: DigitsProxy, exp, params, num: int, num_steps: int, seed: int,
                      teacher_params=None) -> float:
  """% of `num` samples of a text-to-image run on the captioned digits whose proxy-classified digit is their
  prompt's (the digits analogue of the CLIP score)."""
  samples = exp.generate(params, num, num_steps, seed, teacher_params)
  wanted = np.array([captions.caption_digit(p) for p in exp.prompt_texts(len(samples))])
  return 100.0 * float(np.mean(proxy.classify(samples) == wanted))


def proxy_table(rows, proxy: DigitsProxy) -> dict:
  """Prints | model | NFE | FD | for rows of (name, nfe, FD) or (name, nfe, FD, caption agreement %); returns
  {name: FD} and {name + ' caption agreement': %}."""
  agreement = any(len(row) > 3 for row in rows)
  lines = [f'Digits proxy (classifier test accuracy {proxy.test_accuracy:.3f}; Frechet distance to held-out digits, '
           'lower is better' + ('; caption agreement: % of samples classified as their prompt\'s digit' if agreement
                                else '') + ')',
           '| model | NFE | FD |' + (' caption agreement |' if agreement else ''),
           '|---|---|---|' + ('---|' if agreement else '')]
  lines += [f'| {row[0]} | {row[1]} | {row[2]:.3f} |' + (f' {row[3]:.1f} |' if len(row) > 3 else '') for row in rows]
  if jax.process_index() == 0:
    print('\n'.join(lines), flush=True)
  out = {row[0]: row[2] for row in rows}
  out.update({f'{row[0]} caption agreement': row[3] for row in rows if len(row) > 3})
  return out


def _proxy_scores(proxy, exp, params, num: int, num_steps: int, seed: int, teacher_params=None) -> tuple:
  """(FD,) of the digits proxy, and the caption agreement % for a text-to-image run on the captioned digits."""
  fd = proxy_frechet(proxy, exp, params, num, num_steps, seed, teacher_params)
  if not (exp.text_conditioned and exp.config.data.name == 'captioned_digits'):
    return (fd,)
  return fd, caption_agreement(proxy, exp, params, num, num_steps, seed, teacher_params)


def check_scorable(exp) -> None:
  """The proxy classifies 8x8x1 digits: a run whose samples are something else (the 2-D toys) stops in one line."""
  decoded = jax.eval_shape(exp.space.decode, exp.space.params, jax.ShapeDtypeStruct((1,) + exp.shape, jnp.float32))
  if decoded.shape[1:] != digits_proxy.IMAGE_SHAPE:
    raise ValueError(f'The digits proxy of --mode=eval and eval.proxy scores 8x8x1 digits; this run '
                     f'(data.name={exp.config.data.name!r}) makes samples of shape {decoded.shape[1:]}: look at them with '
                     '--mode=sample (WORKDIR/samples), or score images with --mode=fid.')


def quality_report(exp, state, teacher, workdir, images=None) -> dict:
  """Frechet distance of the digits proxy for the teacher (experiment.Teacher or None) and the model, each sampled
  with its own sampler at its evaluation step counts (a diffusion teacher: sampling.teacher_steps; a consistency
  model: eval.steps), then for `images` {name: images} a finished objective returned (e.g. an autoencoder's
  held-out reconstructions)."""
  c = exp.config
  check_scorable(exp)
  proxy = load_or_train_proxy(epath.Path(workdir) / 'proxy_classifier.msgpack')
  rows = []
  if teacher is not None:
    t = teacher.experiment
    for n in t.sampler.eval_steps(t.config):
      rows.append((f'teacher ({t.sampler.label(n)})', t.sampler.nfe(t.config, n),
                   *_proxy_scores(proxy, t, teacher.params, c.eval.num_samples, n, c.seed + 3)))
  for n in exp.sampler.eval_steps(c):
    rows.append((f'{c.objective.name} ({exp.sampler.label(n)})', exp.sampler.nfe(c, n),
                 *_proxy_scores(proxy, exp, state.ema[0], c.eval.num_samples, n, c.seed + 3,
                                None if teacher is None else teacher.params)))
  rows += [(name, 1, proxy.frechet(x)) for name, x in (images or {}).items()]
  return proxy_table(rows, proxy)
