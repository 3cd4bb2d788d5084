"""Frechet distance between Gaussians fitted to feature sets (as in FID)."""

import warnings

import numpy as np
from scipy import linalg


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
  """Mean mu [F] and unbiased covariance sigma [F, F] of features [N, F]."""
  features = np.asarray(features, np.float64)
  if features.ndim != 2 or len(features) < 2:
    raise ValueError(f'Need features [N >= 2, F], got shape {features.shape}.')
  return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
  """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)) between two Gaussians.

  If sqrtm gives a non-finite result, eps * I is added to both covariances;
  imaginary parts that are numerical noise are dropped. Non-finite statistics
  give NaN.
  """
  mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
  sigma1 = np.asarray(sigma1, np.float64)
  sigma2 = np.asarray(sigma2, np.float64)
  if not all(np.all(np.isfinite(a)) for a in (mu1, sigma1, mu2, sigma2)):
    return float('nan')  # (scipy's sqrtm fails on them with an internal error)
  with warnings.catch_warnings():
    # Singular products are common (e.g. dead ReLU features); the finiteness
    # check below decides whether the result needs the eps * I retry.
    warnings.simplefilter('ignore', linalg.LinAlgWarning)
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
      offset = eps * np.eye(len(sigma1))
      covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
  if np.iscomplexobj(covmean):
    max_imag = np.abs(covmean.imag).max()
    if max_imag > 1e-3 * max(1.0, np.abs(covmean.real).max()):
      raise ValueError(f'sqrtm(S1 S2) has a large imaginary part {max_imag}.')
    covmean = covmean.real
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2)
               - 2 * np.trace(covmean))
