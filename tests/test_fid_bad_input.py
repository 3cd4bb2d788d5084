"""FID's bad input (issue 24, item 2): reference statistics with NaN or inf are named, and fid.json never holds NaN
(a non-finite covariance in the Frechet distance: test_one_line_errors)."""

import json

import ml_collections
import numpy as np
import pytest

from cm_jax.evaluation import fid
from test_one_line_errors import _one_line


@pytest.mark.parametrize('where', ['mu', 'sigma'])
def test_reference_statistics_with_nan_or_inf_are_named(tmp_path, where):
  rng = np.random.default_rng(0)
  arrays = {'mu': rng.standard_normal(4), 'sigma': np.eye(4), 'count': np.int64(10)}
  arrays[where].flat[1] = np.nan if where == 'mu' else np.inf
  path = tmp_path / 'reference.npz'
  np.savez(path, **arrays)
  config = ml_collections.ConfigDict(dict(eval=dict(fid=dict(reference=str(path), reference_split='test')),
                                          data=dict(name='digits')))
  extractor = fid.Extractor('digits', None, None, 4)
  with pytest.raises(ValueError) as raised:
    fid.reference_statistics(config, str(tmp_path), extractor, None, 8)
  _one_line(raised, f'Reference statistics {path} hold NaN or inf in {where}')


def test_fid_json_never_holds_nan(tmp_path):
  report = {'checkpoint_step': 40, 'results': {'1-step': {'num_steps': 1, 'nfe': 1, 'fid': 2.5},
                                               '2-step': {'num_steps': 2, 'nfe': 2, 'fid': float('nan')}}}
  with pytest.raises(FloatingPointError) as raised:
    fid.write_report(tmp_path, report)
  _one_line(raised, 'The scores of 2-step are not finite (NaN or inf): the samples of the checkpoint at step 40')
  assert not (tmp_path / 'fid.json').exists()
  report['results']['2-step']['fid'] = 1.5
  fid.write_report(tmp_path, report)
  assert json.loads((tmp_path / 'fid.json').read_text()) == report
