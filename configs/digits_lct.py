"""Improved latent consistency training (Dao et al. 2025) on the 8x8 digits through digits_autoencoder, and its
ablation: each variant adds one of the paper's changes to latent iCT, in the paper's order.

  ict        latent iCT: iCT (pseudo-Huber, lognormal indices, 1 / (sigma_{i+1} - sigma_i), sg target, doubling
             curriculum) on the latents normalised per element with the data set's statistics (x - mu) / s * 0.5
  cauchy     + Cauchy loss log(1 + mean_D d^2 / (2 c^2)), c = 0.00054 sqrt(D)
  diffusion  + the early-time diffusion loss, weight 5, on the quarter of pairs nearest sigma_min
  ot         + exact minibatch optimal-transport pairing of data and noise
  adaptive   + the adaptive c(k) = exp(-1.15 ln(N(k) - 1) - 0.85) after the first curriculum stage
  full       + non-scaling LayerNorm (the default: the paper's whole recipe)

Commands (the autoencoder, the latent cache with its statistics, then a variant):
  python -m cm_jax.main --config=configs/digits_autoencoder.py --workdir=runs/digits_autoencoder
  python -m cm_jax.main --config=configs/digits_lct.py --workdir=runs/digits_lct --mode=encode
  python -m cm_jax.main --config=configs/digits_lct.py[:ict|:cauchy|:diffusion|:ot|:adaptive] \
      --workdir=runs/digits_lct[_VARIANT]
Hardware: 2 CPU cores, minutes per variant (BUILD_NOTES.md, "improved latent CT").
Expected: the digits-proxy table of decoded samples at 1 and 2 steps; the ablation table is in BUILD_NOTES.md.
The digits iCT settings of configs/digits_ict.py (s1 = 80 for the 8000-step run, lr 2e-4); the paper's 10 -> 640
curriculum and RAdam (lr 1e-4, weight decay 1e-4) are in the 256x256 configs (celebahq256_lct.py).
"""

from configs import digits_ict

ABLATION = ('ict', 'cauchy', 'diffusion', 'ot', 'adaptive', 'full')


def get_config(arg='full'):
  if arg not in ABLATION:
    raise ValueError(f'Unknown digits_lct variant {arg!r}; expected one of {ABLATION}.')
  step = ABLATION.index(arg)
  c = digits_ict.get_config()
  c.latent.update(autoencoder='runs/digits_autoencoder', cache='runs/digits_latents', normalization='per_element')
  c.objective.update(
      distance='cauchy' if step >= 1 else 'pseudo_huber', c_schedule='adaptive' if step >= 4 else 'fixed',
      distance_c=0.0, diffusion_loss_weight=5.0 if step >= 2 else 0.0, diffusion_loss_fraction=0.25,
      coupling='exact' if step >= 3 else 'none', sinkhorn_epsilon=0.05)
  c.model.norm = 'nsln' if step >= 5 else 'layer'
  return c
