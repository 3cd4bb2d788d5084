"""sCT on CIFAR-10 (Lu and Song 2024), from scratch, on the DDPM++ network of cifar10_trigflow.

Command:
  python -m cm_jax.main --config=configs/cifar10_sct.py --workdir=runs/cifar10_sct
Hardware: a TPU slice or GPU node (sized like cifar10_edm: 8 GPUs); not run in this project.
Batch 512, 400k iterations (cifar10_trigflow's; unverified).
Settings (reference section 5): tau ~ N(-1.0, 1.4^2), tangent warm-up H = 10k, g / (||g||_2 + 0.1), adaptive
weighting w_phi(t) with the prior 1/(sd tan t), theta- = sg(theta), dropout 0.2, RAdam lr 1e-4, betas (0.9, 0.99),
EMA half-life 0.5 Mimg, 2-step sampling at t = 1.1. A third-party re-implementation (revsic/torch-flow-models
src/flowmodels/sct.py, "default values from Appendix G.2") uses the same P_mean/P_std, H, c, t = 1.1, dropout, lr,
betas, 400k iterations and EMA half-life; sCM publishes no code.
Paper FID: 1 step 2.97 (2.85 in the paper's v2), 2 steps 2.06. Not reproduced here.
"""

from cm_jax.objectives import objective_config
from configs import cifar10_trigflow

SCM = dict(p_mean=-1.0, p_std=1.4, tangent_warmup_steps=10_000, tangent_norm='l2', tangent_norm_c=0.1,
           adaptive_weighting=True, prior_weighting=True, jvp='jvp', fd_eps=1e-3)


def get_config():
  c = cifar10_trigflow.get_config()
  c.objective = objective_config(**dict(SCM, name='sct'))
  c.model.dropout = 0.2
  c.sampling.clip_denoised = False  # sCM publishes no code; its multistep sampler re-noises f's output as is
  return c
