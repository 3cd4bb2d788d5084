"""Streaming FID cost on this machine: Inception features/s per device, and the wall time of a 50k-sample FID of a
digits-size and a CIFAR-10-size run, with the share of it spent outside the networks.

  python benchmarks/fid.py [--digits_samples=50000] [--cifar_samples=256] [--rounds=5]

Inception-v3 runs with random weights in the real layout (no weights file is needed to time it). Each run streams
its samples through evaluation/fid.py's generated_moments (sampling, decoding, features and moments on device,
float64 merging on the host) and, in the same process, times the networks alone on the same batches (sampler and
feature network, jitted together, outputs waited for); share outside = 1 - networks / whole. The digits-size run is
the README's iCT MLP with the digits proxy classifier over all 50k samples; the CIFAR-10-size run (a small UNet
consistency model on 32x32x3 and the FID Inception) is timed on --cifar_samples and scaled to 50k. The last line:
`fid: inception_images_per_s_per_device=<x> digits_50k_s=<x> digits_outside=<x.xx> cifar_50k_s=<x>
cifar_outside=<x.xx>`.
"""

import pathlib
import tempfile
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import PIL.Image

from cm_jax import experiment
from cm_jax.evaluation import fid
from cm_jax.evaluation import inception
from cm_jax.evaluation.digits_proxy import DigitsProxy
from configs import digits_ict

_DIGITS = flags.DEFINE_integer('digits_samples', 50_000, 'Samples of the digits-size FID.')
_CIFAR = flags.DEFINE_integer('cifar_samples', 256, 'Samples timed for the CIFAR-10-size FID (scaled to 50k).')
_ROUNDS = flags.DEFINE_integer('rounds', 5, 'Timing rounds of the Inception throughput.')


def random_inception() -> fid.Extractor:
  """The FID Inception with random weights (batch statistics at their initial mean 0, variance 1)."""
  x = jnp.zeros((1, inception.RESOLUTION, inception.RESOLUTION, 3))
  return fid.inception_extractor(jax.jit(inception.InceptionV3().init)(jax.random.key(0), x))


def inception_rate(rounds: int, batch: int = 64) -> float:
  """Median images/s of the jitted Inception on one device, 32x32 uint8 inputs."""
  extractor = random_inception()
  fn = jax.jit(lambda p, x: extractor.apply(p, x)[0])
  images = jax.random.uniform(jax.random.key(1), (batch, 32, 32, 3), minval=-1, maxval=1)
  fn(extractor.params, images).block_until_ready()
  times = []
  for _ in range(rounds):
    start = time.perf_counter()
    fn(extractor.params, images).block_until_ready()
    times.append(time.perf_counter() - start)
  return batch / float(np.median(times))


def fid_time(config, extractor: fid.Extractor, num: int) -> tuple[float, float]:
  """(seconds for `num` samples through generated_moments, share of it outside the networks)."""
  exp = experiment.Experiment(config)
  params, batch = exp.init_state().ema[0], config.train.batch_size
  networks = jax.jit(lambda p, s, e, rng: extractor.apply(e, exp.draw(p, s, rng, batch, 1))[0])
  key = jax.random.PRNGKey(0)
  fid.generated_moments(exp, params, extractor, batch, 1, 0, batch)  # compiles (the batch function is cached)
  networks(params, exp.space.params, extractor.params, key).block_until_ready()
  start = time.perf_counter()
  fid.generated_moments(exp, params, extractor, num, 1, 0, batch)
  whole = time.perf_counter() - start
  start = time.perf_counter()
  for i in range(-(-num // batch)):
    networks(params, exp.space.params, extractor.params, jax.random.fold_in(key, i)).block_until_ready()
  return whole, 1.0 - (time.perf_counter() - start) / whole


def cifar_sized_config(folder):
  """digits_ict's recipe on 32x32x3 images (8 random PNGs in `folder`: only their shape matters) with a small UNet."""
  class_dir = pathlib.Path(folder) / 'train' / '0'
  class_dir.mkdir(parents=True)
  rng = np.random.default_rng(0)
  for i in range(8):
    PIL.Image.fromarray(rng.integers(0, 256, (32, 32, 3), np.uint8)).save(class_dir / f'{i}.png')
  config = digits_ict.get_config()
  config.data.update(name='image_folder', path=str(folder))
  config.model = ml_collections.ConfigDict(dict(
      name='unet', channels=32, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), num_classes=0))
  config.train.batch_size = 64
  return config


def main(argv):
  del argv
  rate = inception_rate(_ROUNDS.value)
  print(f'Inception-v3 (FID variant), 64 images 32x32 -> 299: {rate:.1f} images/s per device', flush=True)

  config = digits_ict.get_config()
  digits_s, digits_out = fid_time(config, fid.digits_extractor(DigitsProxy.train(seed=0, steps=50)),
                                  _DIGITS.value)
  digits_s *= 50_000 / _DIGITS.value
  print(f'digits-size FID (MLP iCT, digits proxy features): {digits_s:.1f} s for 50k samples, '
        f'{100 * digits_out:.1f}% outside the networks', flush=True)

  with tempfile.TemporaryDirectory() as folder:
    cifar_s, cifar_out = fid_time(cifar_sized_config(folder), random_inception(), _CIFAR.value)
  cifar_s *= 50_000 / _CIFAR.value
  print(f'CIFAR-10-size FID (UNet iCT on 32x32x3, Inception): {cifar_s / 3600:.2f} h for 50k samples '
        f'(from {_CIFAR.value}), {100 * cifar_out:.1f}% outside the networks', flush=True)
  print(f'fid: inception_images_per_s_per_device={rate:.1f} digits_50k_s={digits_s:.1f} '
        f'digits_outside={digits_out:.2f} cifar_50k_s={cifar_s:.0f} cifar_outside={cifar_out:.2f}')


if __name__ == '__main__':
  app.run(main)
