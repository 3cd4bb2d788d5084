"""The small-data quality table: digits-proxy Frechet distance of each model's samples."""

import jax

from cm_jax.evaluation.digits_proxy import DigitsProxy


def load_or_train_proxy(path) -> DigitsProxy:
  """The proxy classifier cached at `path`, trained (and cached) on first use."""
  if path.exists():
    return DigitsProxy.load(path)
  proxy = DigitsProxy.train(seed=0)
  if jax.process_index() == 0:
    proxy.save(path)
  return proxy


def proxy_table(rows, classifier_path) -> dict:
  """Prints | model | NFE | FD | for rows of (name, nfe, samples [N, 8, 8, 1]); returns {name: FD}."""
  proxy = load_or_train_proxy(classifier_path)
  results = {name: proxy.frechet(samples) for name, _, samples in rows}
  lines = [f'Digits proxy (classifier test accuracy {proxy.test_accuracy:.3f}; Frechet distance to held-out digits, '
           'lower is better)', '| model | NFE | FD |', '|---|---|---|']
  lines += [f'| {name} | {nfe} | {results[name]:.3f} |' for name, nfe, _ in rows]
  if jax.process_index() == 0:
    print('\n'.join(lines), flush=True)
  return results
