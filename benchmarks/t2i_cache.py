"""A text-to-image train step from the latent cache of --mode=encode against the same step encoding on the fly, in one
run: the step time ratio (cached / on the fly), the per-batch read time of each data source, the first step's loss of
each (same initial state and batch) and the float16 rounding of the cached text states.

  python benchmarks/t2i_cache.py [--config=configs/digits_t2i_ddpm.py] [--batch_size=64] [--steps=10] [--rounds=5] \
      [--cache=/tmp/t2i_cache]
  python benchmarks/t2i_cache.py --architecture=sd15|sd21_base|sdxl

--architecture instead estimates, for a public Stable Diffusion architecture at its resolution (models/sd_configs.py;
nothing is run or read, XLA's cost analysis of the lowered forward programs for one image), the share of a step's
flops the cache removes: (VAE encoder + text towers) / (step), a DDPM step being 3 UNet forwards (forward and
backward) plus the encoders and an LCD step 6 (the student's 3, the target's 1, the guided teacher's 2); it prints
`estimate: ddpm=<x.xx> lcd=<x.xx>`, the flop ratios (cached / on the fly) a flop-bound step would show.

The config is a text-to-image run (latent.pipeline; default the digits pipeline, whose 8x8 digits have no VAE, so
the cache saves the text tower only; a Stable Diffusion pipeline's also saves the VAE encoder). --cache is written
with --mode=encode's writer first (kept, and reused when it is complete); the step is then compiled for both
sources and timed on one prepared batch each in interleaved rounds (each round runs --steps steps of each), so a
change of machine load shifts both alike. Prints the medians, XLA's flop count of each step (the cached one lacks the
encoders'), the mean time of source.get for one batch of each, and last `ratio: cached/on_the_fly=<x.xx>` (the
median over rounds of the per-round ratio; below 1: the cache is faster).
"""

import statistics
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import config_flags

from cm_jax import experiment
from cm_jax import latents
from cm_jax import text_latents
from cm_jax.models import clip_text
from cm_jax.models import sd_configs
from cm_jax.models import sd_unet
from cm_jax.models.autoencoder import AutoencoderKL

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/digits_t2i_ddpm.py', 'A text-to-image run to time.')
_BATCH = flags.DEFINE_integer('batch_size', 64, 'Global batch size.')
_STEPS = flags.DEFINE_integer('steps', 10, 'Timed steps per source per round (after 3 warm-up steps).')
_ROUNDS = flags.DEFINE_integer('rounds', 5, 'Interleaved timing rounds.')
_CACHE = flags.DEFINE_string('cache', '/tmp/t2i_cache', 'Where the latent cache is written (or found complete).')
_ARCHITECTURE = flags.DEFINE_string('architecture', '', 'A public SD architecture: estimate its flop ratios instead.')


def _flops(compiled) -> float:
  """XLA's flop count of a compiled program (cost_analysis: a dict, or a list of one in older jax)."""
  cost = compiled.cost_analysis()
  return float((cost[0] if isinstance(cost, list) else cost).get('flops', float('nan')))


def _forward_flops(name: str) -> tuple:
  """(VAE encoder, text towers, UNet) forward flops of one image at the architecture's resolution (abstract)."""
  arch = sd_configs.architecture(name)
  side, width = arch['resolution'], arch['unet']['cross_attention_dim']
  shape = lambda *s, dtype=jnp.float32: jax.ShapeDtypeStruct(s, dtype)
  cost = lambda fn, *args: _flops(jax.jit(fn).lower(*args))
  vae = latents.module_from_config(arch['vae'], name)
  params = jax.eval_shape(vae.init, jax.random.PRNGKey(0), shape(1, 16, 16, 3))
  encoder = cost(lambda p, x: vae.apply(p, x, method=AutoencoderKL.encode), params, shape(1, side, side, 3))
  text = 0.0
  for config in arch['text_encoders']:
    tower = clip_text.module_from_config(config, name)
    params = jax.eval_shape(tower.init, jax.random.PRNGKey(0), shape(1, 77, dtype=jnp.int32))
    text += cost(tower.apply, params, shape(1, 77, dtype=jnp.int32))
  unet = sd_unet.module_from_config(arch['unet'], name)
  inputs = (shape(1, side // 8, side // 8, 4), shape(1, dtype=jnp.int32), shape(1, 77, width))
  added = None
  if arch['unet'].get('addition_embed_type') == 'text_time':
    pooled = arch['unet']['projection_class_embeddings_input_dim'] - 6 * arch['unet']['addition_time_embed_dim']
    added = dict(text_embeds=shape(1, pooled), time_ids=shape(1, 6))
  apply = lambda p, x, t, c, a: unet.apply(p, x, t, c, added_cond=a)
  params = jax.eval_shape(lambda x, t, c, a: unet.init(jax.random.PRNGKey(0), x, t, c, added_cond=a), *inputs, added)
  return encoder, text, cost(apply, params, *inputs, added)


def _estimate(name: str) -> None:
  encoder, text, unet = _forward_flops(name)
  print(f'{name} at {sd_configs.architecture(name)["resolution"]} px, one image: VAE encoder {encoder / 1e9:.1f} '
        f'GFLOP, text tower(s) {text / 1e9:.2f} GFLOP, UNet forward {unet / 1e9:.1f} GFLOP')
  ratio = lambda forwards: forwards * unet / (forwards * unet + encoder + text)
  print(f'estimate: ddpm={ratio(3):.2f} lcd={ratio(6):.2f}')


def _stepper(config):
  """{'run': run(n) -> seconds per step of n steps, 'read': seconds per source.get of one batch, 'flops': XLA's of the
  step, 'loss': the first step's, 'batch': the host batch, 'exp'} of `config` on one device."""
  exp = experiment.Experiment(config, jax.devices()[:1])
  step_fn, frozen, state = exp.train_step(), exp.frozen(), exp.init_state()
  indices = np.arange(config.train.batch_size) % len(exp.source)
  start = time.perf_counter()
  for _ in range(3):
    host = exp.source.get(indices)
  read = (time.perf_counter() - start) / 3
  batch = jax.device_put(host, exp.batch_sharding)
  flops = _flops(step_fn.lower(state, batch, frozen).compile())
  holder = [state]

  def run(n):
    start = time.perf_counter()
    for _ in range(n):
      holder[0], metrics = step_fn(holder[0], batch, frozen)
    jax.block_until_ready(metrics['loss'])
    return (time.perf_counter() - start) / n
  holder[0], metrics = step_fn(holder[0], batch, frozen)
  loss = float(metrics['loss'])
  run(2)  # warm up
  return dict(run=run, read=read, flops=flops, loss=loss, batch=host, exp=exp)


def _text_error(cached) -> str:
  """The float16 rounding of the cached batch's hidden states against the pipeline's float32 states."""
  exp = cached['exp']
  indices = np.arange(exp.config.train.batch_size) % len(exp.source)
  exact = np.asarray(exp.space.pipe.encode_prompt(exp.source.captions(indices))[0], np.float64)
  error = np.abs(cached['batch'][text_latents.HIDDEN].astype(np.float64) - exact)
  big = np.abs(exact) > 1e-3
  rms = np.sqrt((error**2).mean() / (exact**2).mean())
  return (f'text states ({text_latents.TEXT_DTYPE.__name__}): max |error| {error.max():.2e}, max relative '
          f'{(error[big] / np.abs(exact[big])).max():.2e}, rms relative {rms:.2e}')


def main(argv):
  del argv
  if _ARCHITECTURE.value:
    return _estimate(_ARCHITECTURE.value)
  config = _CONFIG.value
  config.train.batch_size = _BATCH.value
  cached = config.copy_and_resolve_references()
  cached.latent.cache = _CACHE.value
  if latents.complete_cache(cached, _CACHE.value) is None:
    start = time.perf_counter()
    latents.write_cache(cached, _CACHE.value)
    print(f'encoded {_CACHE.value} in {time.perf_counter() - start:.1f} s')
  runs = {'on_the_fly': _stepper(config), 'cached': _stepper(cached)}
  times = {name: [] for name in runs}
  for _ in range(_ROUNDS.value):
    for name, r in runs.items():
      times[name].append(r['run'](_STEPS.value))
  for name, r in runs.items():
    print(f'{name}: step {statistics.median(times[name]) * 1e3:.1f} ms (median of {_ROUNDS.value} rounds), '
          f'{r["flops"] / 1e9:.3f} GFLOP (XLA), source.get {r["read"] * 1e3:.1f} ms per batch of {_BATCH.value}, '
          f'first loss {r["loss"]:.7f}')
  print(_text_error(runs['cached']))
  ratio = statistics.median(c / o for c, o in zip(times['cached'], times['on_the_fly']))
  print(f'ratio: cached/on_the_fly={ratio:.2f}')


if __name__ == '__main__':
  app.run(main)
