"""The small-data quality table: digits-proxy Frechet distance of each model's samples."""

import jax

from cm_jax.evaluation import fid
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


def proxy_table(rows, proxy: DigitsProxy) -> dict:
  """Prints | model | NFE | FD | for rows of (name, nfe, FD); returns {name: FD}."""
  lines = [f'Digits proxy (classifier test accuracy {proxy.test_accuracy:.3f}; Frechet distance to held-out digits, '
           'lower is better)', '| model | NFE | FD |', '|---|---|---|']
  lines += [f'| {name} | {nfe} | {fd:.3f} |' for name, nfe, fd in rows]
  if jax.process_index() == 0:
    print('\n'.join(lines), flush=True)
  return {name: fd for name, _, fd in rows}
