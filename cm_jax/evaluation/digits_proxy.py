"""An FID-like quality proxy for 8x8 digits, from a classifier trained in-project.

A small CNN is trained on the digits 'train' split; the Frechet distance
between its penultimate (64-d, post-ReLU) features of generated images and of
the held-out 'test' digits plays the role of FID's Inception features.
"""

from etils import epath
import flax
import flax.linen as nn
import jax
import numpy as np
import optax

from cm_jax.data.digits import load_digits
from cm_jax.evaluation.frechet import feature_statistics, frechet_distance

IMAGE_SHAPE = (8, 8, 1)


class DigitsCNN(nn.Module):
  """Conv-ReLU-Pool-Conv-ReLU-Pool-Dense-ReLU (features), then a linear head."""
  num_classes: int = 10
  num_features: int = 64

  @nn.compact
  def __call__(self, images):
    """Maps images [N, 8, 8, 1] to (logits [N, 10], features [N, 64])."""
    h = nn.relu(nn.Conv(32, (3, 3), name='conv_0')(images))
    h = nn.avg_pool(h, (2, 2), strides=(2, 2))
    h = nn.relu(nn.Conv(64, (3, 3), name='conv_1')(h))
    h = nn.avg_pool(h, (2, 2), strides=(2, 2))
    features = nn.relu(nn.Dense(self.num_features, name='dense')(
        h.reshape(len(h), -1)))
    return nn.Dense(self.num_classes, name='head')(features), features


_forward = jax.jit(lambda params, images: DigitsCNN().apply(
    {'params': params}, images))


def _abstract_params():
  """Shapes and dtypes of the DigitsCNN parameters, without initialising."""
  return jax.eval_shape(DigitsCNN().init, jax.random.key(0),
                        np.zeros((1, *IMAGE_SHAPE), np.float32))['params']


def _train_params(seed, steps, batch_size, learning_rate):
  """Adam on softmax cross-entropy over random train-split batches."""
  images, labels = load_digits('train')
  model = DigitsCNN()
  tx = optax.adam(learning_rate)

  @jax.jit
  def step(params, opt_state, images, labels):
    def loss_fn(params):
      logits, _ = model.apply({'params': params}, images)
      return optax.softmax_cross_entropy_with_integer_labels(
          logits, labels).mean()
    updates, opt_state = tx.update(jax.grad(loss_fn)(params), opt_state)
    return optax.apply_updates(params, updates), opt_state

  params = jax.jit(model.init)(jax.random.key(seed), images[:1])['params']
  opt_state = tx.init(params)
  rng = np.random.default_rng(seed)
  # A Python loop: XLA:CPU runs these convolutions ~20x slower inside a scan.
  for _ in range(steps):
    batch = rng.choice(len(images), batch_size, replace=False)
    params, opt_state = step(params, opt_state, images[batch], labels[batch])
  return jax.device_get(params)


class DigitsProxy:
  """Frechet distance to held-out digits in a trained classifier's features.

  Attributes:
    params: the DigitsCNN parameters.
    test_accuracy: the classifier's accuracy on the held-out 'test' split.
    reference: (mu, sigma) of the held-out 'test' digits' features.
  """

  def __init__(self, params):
    """Wraps trained params; scores them and fits the test-split statistics."""
    self.params = params
    images, labels = load_digits('test')
    logits, features = _forward(params, images)
    self.test_accuracy = float(np.mean(np.argmax(logits, -1) == labels))
    self.reference = feature_statistics(features)

  @classmethod
  def train(cls, seed: int = 0, steps: int = 400, batch_size: int = 128,
            learning_rate: float = 2e-3) -> 'DigitsProxy':
    """Trains the classifier on the 'train' split (deterministic given seed)."""
    return cls(_train_params(seed, steps, batch_size, learning_rate))

  def features(self, images) -> np.ndarray:
    """Penultimate features [N, 64] of images float32 [N, 8, 8, 1] in [-1, 1]."""
    images = np.asarray(images, np.float32)
    if images.shape[1:] != IMAGE_SHAPE:
      raise ValueError(f'Expected images [N, 8, 8, 1], got {images.shape}.')
    return np.asarray(_forward(self.params, images)[1], np.float64)

  def classify(self, images) -> np.ndarray:
    """The classifier's digit [N] for images float32 [N, 8, 8, 1] in [-1, 1]."""
    return np.argmax(np.asarray(_forward(self.params, np.asarray(images, np.float32))[0]), -1)

  def frechet(self, images) -> float:
    """FD(N(mu_g, S_g), N(mu_test, S_test)) in feature space; lower is better."""
    return frechet_distance(*feature_statistics(self.features(images)),
                            *self.reference)

  def save(self, path) -> None:
    """Writes the classifier parameters to `path` (msgpack)."""
    path = epath.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(flax.serialization.msgpack_serialize(self.params))

  @classmethod
  def load(cls, path) -> 'DigitsProxy':
    """Reads a classifier written by `save`; errors name the path."""
    path = epath.Path(path)
    if not path.exists():
      raise FileNotFoundError(f'No digits proxy classifier at {path}.')
    try:
      params = flax.serialization.msgpack_restore(path.read_bytes())
    except Exception as e:  # OS and msgpack errors alike.
      raise ValueError(
          f'Cannot read a digits proxy classifier from {path}: {e}') from e
    expected = jax.tree.map(lambda p: p.shape, _abstract_params())
    if jax.tree.map(np.shape, params) != expected:
      raise ValueError(f'{path} does not hold DigitsCNN parameters.')
    return cls(params)
