"""Flow matching (SiT-style: z_t = (1 - t) x + t e, v-prediction) on class-conditional ImageNet 256x256 latents: the
baseline of imagenet256_meanflow (`:b2`, `:l2`, `:xl2`; default xl2) on the same DiT, data, latents, optimiser and
time distribution, the network with one time input (no second_time) and the classes dropped by the network
(model.label_dropout = 0.1, as DiT / SiT train for guidance; flow matching has no objective.class_dropout).

Pre-flight (the FM row beside the MF-XL/2 row of BUILD_NOTES.md; the VAE folder's config.json is all it needs):
  python -m cm_jax.preflight --config=configs/imagenet256_flow_matching.py:xl2 --topology=v5p:2x2x1 \
      --config.latent.autoencoder=/path/to/sd-vae-ft-mse --config.mesh.shape.data=1 --config.mesh.shape.fsdp=-1 \
      --config.model.attention_kernel=xla --nosampler
Training: the commands of imagenet256_meanflow with this config. Hardware: a TPU v5p slice; not run in this project.
Sampling: sampling.teacher_steps Euler steps of the ODE (SiT's 250-step sampler is not reproduced: unverified).
"""

from cm_jax.objectives import objective_config
from configs import imagenet256_meanflow


def get_config(arg: str = 'xl2'):
  c = imagenet256_meanflow.get_config(arg)
  c.model.update(second_time=False, label_dropout=0.1)
  c.objective = objective_config(name='flow_matching', p_mean=-0.4, p_std=1.0)
  c.sampling.teacher_steps = 50
  return c
