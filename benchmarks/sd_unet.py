"""The Flax Stable Diffusion UNet (cm_jax/models/sd_unet.py) against diffusers' PyTorch UNet2DConditionModel on the
host CPU: forward and a DDPM train step (epsilon MSE, Adam) at the same config, batch and weights, same-run medians.

  python benchmarks/sd_unet.py [--batch=4] [--side=16] [--widths=32,64] [--cross=64] [--rounds=5] [--steps=5] \
      [--threads=0]

The UNet is SD-1.x-shaped (CrossAttnDownBlock2D + DownBlock2D, 8 heads, 2 layers per block, conv projections) and
small enough for a CPU; diffusers builds it, save_pretrained writes it, sd_unet.load_unet reads it, so both run the
same weights (the forward outputs are compared first). Both run in float32. Timings are interleaved rounds: each
round times --steps calls of each of the four programs in turn, so a change of load on a shared host shifts both
sides alike. Prints the medians and, last, `ratios: forward=<jax/torch> train=<jax/torch>` (the median over rounds
of the per-round ratio; below 1: JAX is faster).
"""

import statistics
import tempfile
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import optax

from cm_jax.models import sd_unet

_BATCH = flags.DEFINE_integer('batch', 4, 'Batch size.')
_SIDE = flags.DEFINE_integer('side', 16, 'Latent side (pixels of the UNet input).')
_WIDTHS = flags.DEFINE_list('widths', ['32', '64'], 'block_out_channels.')
_CROSS = flags.DEFINE_integer('cross', 64, 'cross_attention_dim (the text states\' width).')
_LENGTH = flags.DEFINE_integer('length', 77, 'Text tokens.')
_ROUNDS = flags.DEFINE_integer('rounds', 5, 'Interleaved timing rounds.')
_STEPS = flags.DEFINE_integer('steps', 5, 'Timed calls per program per round (after 2 warm-up calls).')
_THREADS = flags.DEFINE_integer('threads', 0, 'torch.set_num_threads (0: torch\'s default).')


def _median_seconds(fn, steps: int) -> float:
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def main(argv):
  del argv
  jax.config.update('jax_platforms', 'cpu')  # a TPU VM's chips (or libtpu's probing) are not this benchmark's
  import diffusers  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  if _THREADS.value:
    torch.set_num_threads(_THREADS.value)
  widths = tuple(int(w) for w in _WIDTHS.value)
  torch.manual_seed(0)
  model = diffusers.UNet2DConditionModel(
      sample_size=_SIDE.value, in_channels=4, out_channels=4, block_out_channels=widths, layers_per_block=2,
      down_block_types=('CrossAttnDownBlock2D',) * (len(widths) - 1) + ('DownBlock2D',),
      up_block_types=('UpBlock2D',) + ('CrossAttnUpBlock2D',) * (len(widths) - 1),
      cross_attention_dim=_CROSS.value, attention_head_dim=8, norm_num_groups=min(32, widths[0]))
  with torch.no_grad():  # move the zero-initialised layers (conv_out) so the comparison sees every path
    for p in model.parameters():
      p.add_(0.02 * torch.randn_like(p))
  with tempfile.TemporaryDirectory() as folder:
    model.save_pretrained(folder)
    module, params, _ = sd_unet.load_unet(folder)
  count = sum(p.numel() for p in model.parameters())
  b, s = _BATCH.value, _SIDE.value
  rng = np.random.default_rng(0)
  x = rng.standard_normal((b, s, s, 4)).astype(np.float32)  # NHWC; torch gets NCHW
  eps = rng.standard_normal((b, s, s, 4)).astype(np.float32)
  text = rng.standard_normal((b, _LENGTH.value, _CROSS.value)).astype(np.float32)
  t = rng.integers(0, 1000, (b,)).astype(np.int32)
  tx_t, teps, ttext, tt = (torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))),
                           torch.from_numpy(np.ascontiguousarray(eps.transpose(0, 3, 1, 2))),
                           torch.from_numpy(text), torch.from_numpy(t).long())

  # --- forward --------------------------------------------------------------------------------------------
  forward = jax.jit(lambda p, x, t, c: module.apply({'params': p}, x, t, c))
  jx, jt, jtext, jeps = (jnp.asarray(a) for a in (x, t, text, eps))
  model.eval()

  def torch_forward():
    with torch.no_grad():
      return model(tx_t, tt, ttext).sample

  ours = np.asarray(forward(params, jx, jt, jtext))
  theirs = torch_forward().numpy().transpose(0, 2, 3, 1)
  error = float(np.max(np.abs(ours - theirs)) / np.max(np.abs(theirs)))

  # --- train step: epsilon MSE of the noisy input, Adam -------------------------------------------------
  tx = optax.adam(1e-4)

  def loss_fn(p):
    return jnp.mean((module.apply({'params': p}, jx, jt, jtext) - jeps) ** 2)

  @jax.jit
  def jax_step(p, opt_state):
    loss, grads = jax.value_and_grad(loss_fn)(p)
    updates, opt_state = tx.update(grads, opt_state, p)
    return optax.apply_updates(p, updates), opt_state, loss

  state = [params, tx.init(params)]

  def jax_train():
    state[0], state[1], loss = jax_step(*state)
    loss.block_until_ready()

  model.train()
  optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)

  def torch_train():
    optimizer.zero_grad(set_to_none=True)
    loss = torch.nn.functional.mse_loss(model(tx_t, tt, ttext).sample, teps)
    loss.backward()
    optimizer.step()

  programs = {'jax_forward': lambda: forward(params, jx, jt, jtext).block_until_ready(),
              'torch_forward': torch_forward, 'jax_train': jax_train, 'torch_train': torch_train}
  for fn in programs.values():  # compile / warm up
    fn()
    fn()
  rounds = {name: [] for name in programs}
  for _ in range(_ROUNDS.value):
    for name, fn in programs.items():
      rounds[name].append(_median_seconds(fn, _STEPS.value))
  print(f'UNet2DConditionModel block_out_channels={widths} layers_per_block=2 cross_attention_dim={_CROSS.value} '
        f'{count / 1e6:.2f}M parameters; batch {b} x {s}x{s}x4 latents, {_LENGTH.value} text tokens; float32 on '
        f'{jax.devices()[0].device_kind} (torch {torch.__version__}, {torch.get_num_threads()} threads; '
        f'jax {jax.__version__}); forward max |jax - torch| / max |torch| = {error:.2e}')
  for name, times in rounds.items():
    print(f'  {name}: median {statistics.median(times) * 1e3:.2f} ms (rounds: '
          + ', '.join(f'{t * 1e3:.1f}' for t in times) + ')')
  ratio = lambda kind: statistics.median(j / p for j, p in zip(rounds[f'jax_{kind}'], rounds[f'torch_{kind}']))
  print(f'ratios: forward={ratio("forward"):.2f} train={ratio("train"):.2f}', flush=True)


if __name__ == '__main__':
  app.run(main)
