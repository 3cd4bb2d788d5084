"""The second time input of every network (model.second_time, layers.Conditioned.interval_embedding): MeanFlow's
(t, t - r) conditioning on the MLP, UNet, NCSN++, ADM and DiT.

A two-time network is its one-time network plus the embedding 'interval_embed' of h = t - r (the same kind and widths
as the time embedding, added to it); its output depends on h; a fresh 'zeros' embedding changes nothing (the network
is then its one-time network, whatever h), a fresh 'normal' one does; a network without the option refuses an
interval; and one MeanFlow train step runs on the UNet, NCSN++ and ADM with it.
"""

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from cm_jax.formats import diffusers
from cm_jax.models import build_model, checkpoints
from cm_jax.objectives import make_objective, meanflow
from cm_jax.parameterization import FlowMatching
from configs import cifar10_meanflow, imagenet256_imeanflow

# One level on 8x8 images (the conditioning under test is the same at every level, and compiles stay short).
_ONE_LEVEL = dict(channels=8, channel_mult=(1,), num_res_blocks=1, attn_resolutions=(8,))
NETWORKS = {  # name -> (fields, input shape, (embedding width, sinusoid features))
    'mlp': (dict(name='mlp', hidden=16, depth=1), (2, 6), (16, 16)),
    'unet': (dict(_ONE_LEVEL, name='unet'), (2, 8, 8, 3), (32, 8)),
    'ncsnpp': (dict(_ONE_LEVEL, name='ncsnpp', dropout=0.0, time_embedding='fourier', time_scale=16.0,
                    noise_mult=2), (2, 8, 8, 3), (32, 16)),
    'adm': (dict(_ONE_LEVEL, name='adm', head_dim=4, num_classes=0, dropout=0.0), (2, 8, 8, 3), (32, 8)),
    'dit': (dict(name='dit', size='', depth=1, hidden=16, heads=2, patch_size=2), (2, 8, 8, 3), (16, 256)),
}
C_NOISE = jnp.array([0.3, 0.8])


def _model(name, **fields):
  return build_model(dict(NETWORKS[name][0], **fields))


def _x(name, seed=0):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(NETWORKS[name][1]), jnp.float32)


def _init(name, **fields):
  """The network's parameters at a fresh init (key 0)."""
  model = _model(name, **fields)
  return jax.jit(lambda x: model.init({'params': jax.random.key(0)}, x, C_NOISE)['params'])(_x(name))


def _flat(params):
  return flax.traverse_util.flatten_dict(params, sep='/')


def _randomised(params, keep='', seed=0):
  """Every parameter redrawn in numpy, non-zero (kernels N(0, 1/fan_in), vectors N(0, 0.1^2), scales 1 + that),
  except those whose path starts with `keep`."""
  rng = np.random.default_rng(seed)

  def draw(path, p):
    if keep and path.startswith(keep):
      return p
    noise = rng.standard_normal(p.shape).astype(np.float32)
    if p.ndim > 1:
      return jnp.asarray(noise / np.sqrt(np.prod(p.shape[:-1])))
    return jnp.asarray((1.0 if path.endswith('scale') else 0.0) + 0.1 * noise)

  return flax.traverse_util.unflatten_dict({k: draw(k, v) for k, v in _flat(params).items()}, sep='/')


def _without_interval(params):
  return flax.traverse_util.unflatten_dict(
      {k: v for k, v in _flat(params).items() if not k.startswith('interval_embed/')}, sep='/')


def _apply(model, params, x, interval=None):
  return jax.jit(lambda p, x, h: model.apply({'params': p}, x, C_NOISE, interval=h))(params, x, interval)


@pytest.mark.parametrize('name', sorted(NETWORKS))
def test_two_time_network_is_the_one_time_network_plus_its_interval_embedding(name):
  """The same parameters at the same init (the one-time tree unchanged), plus interval_embed: sinusoids of h -> a
  dense layer of the embedding's width -> another, as the time embedding's."""
  width, sinusoids = NETWORKS[name][2]
  one, two = _flat(_init(name)), _flat(_init(name, second_time=True))
  extra = {k: v.shape for k, v in two.items() if k not in one}
  assert extra == {'interval_embed/dense_0/kernel': (sinusoids, width), 'interval_embed/dense_0/bias': (width,),
                   'interval_embed/dense_1/kernel': (width, width), 'interval_embed/dense_1/bias': (width,)}
  assert set(one) <= set(two)
  for k, v in one.items():
    np.testing.assert_array_equal(two[k], v, err_msg=k)


@pytest.mark.parametrize('name', sorted(NETWORKS))
def test_output_depends_on_the_interval(name):
  """With trained (here: random) parameters, F(x, t, h) differs for two intervals in every example, and h = None
  is h = 0."""
  model = _model(name, second_time=True)
  params, x = _randomised(_init(name, second_time=True)), _x(name, 1)
  none, zero = _apply(model, params, x), _apply(model, params, x, jnp.zeros(2))
  np.testing.assert_allclose(none, zero, rtol=1e-6, atol=1e-6)
  a, b = _apply(model, params, x, jnp.array([0.1, 0.2])), _apply(model, params, x, jnp.array([0.5, 0.7]))
  assert np.all(np.abs(np.asarray(a - b)).reshape(2, -1).max(1) > 1e-4)


@pytest.mark.parametrize('name', sorted(NETWORKS))
def test_a_fresh_interval_embedding_by_its_init(name):
  """The rest of the network trained (random), interval_embed fresh: with interval_init='zeros' (its last layer
  zero, its first not) F is the one-time network with the same other parameters for every h; with 'normal' (the
  default) the fresh embedding already moves F with h."""
  x = _x(name, 2)
  one_time = _model(name)
  fresh = _init(name, second_time=True, interval_init='zeros')
  params = _randomised(fresh, keep='interval_embed/')
  assert not np.any(params['interval_embed']['dense_1']['kernel'])
  assert np.all(np.abs(np.asarray(params['interval_embed']['dense_0']['kernel'])).max(0) > 0)
  reference = _apply(one_time, _without_interval(params), x)
  model = _model(name, second_time=True, interval_init='zeros')
  for h in (None, jnp.array([0.0, 0.0]), jnp.array([0.3, 0.9])):
    np.testing.assert_allclose(_apply(model, params, x, h), reference, rtol=1e-6, atol=1e-6)

  normal = _model(name, second_time=True)
  params = _randomised(_init(name, second_time=True), keep='interval_embed/')
  a, b = _apply(normal, params, x, jnp.array([0.1, 0.2])), _apply(normal, params, x, jnp.array([0.5, 0.7]))
  assert np.all(np.abs(np.asarray(a - b)).reshape(2, -1).max(1) > 1e-4)


@pytest.mark.parametrize('name', sorted(NETWORKS))
def test_a_one_time_network_refuses_an_interval(name):
  model = _model(name)
  x = _x(name)
  with pytest.raises(ValueError, match=r'without a second time input \(set model.second_time=True\)'):
    jax.eval_shape(lambda: model.init({'params': jax.random.key(0)}, x, C_NOISE, interval=jnp.zeros(2)))
  bad = _model(name, second_time=True, interval_init='uniform')
  with pytest.raises(ValueError, match=r"model.interval_init='uniform'; expected one of \('normal', 'zeros'\)"):
    jax.eval_shape(lambda: bad.init({'params': jax.random.key(0)}, x, C_NOISE))


@pytest.mark.parametrize('name,layout', [('adm', 'edm'), ('adm', 'guided_diffusion')])
def test_the_released_weight_layouts_have_no_second_time(name, layout):
  """EDM's DhariwalUNet and guided-diffusion's UNet are their files' networks: no second time there (EDM's SongUNet
  has the MeanFlow port's, tested below)."""
  x = _x(name)
  model = _model(name, second_time=True, layout=layout)
  with pytest.raises(ValueError, match=rf"model.second_time=True is an option of model.layout='cm_jax'; "
                                       rf"model.layout='{layout}'"):
    jax.eval_shape(lambda: model.init({'params': jax.random.key(0)}, x, C_NOISE))
  one_time = _model(name, layout=layout)
  with pytest.raises(ValueError, match='set model.second_time=True'):
    jax.eval_shape(lambda: one_time.init({'params': jax.random.key(0)}, x, C_NOISE, interval=jnp.zeros(2)))


@pytest.mark.parametrize('name', ['unet', 'ncsnpp', 'adm', 'ncsnpp_edm'])
def test_a_meanflow_train_step_on_the_convolutional_networks(name):
  """One MeanFlow loss of cifar10_meanflow's objective (one jax.jvp through the network), its gradient and an Adam
  step: finite, the gradient reaches both layers of the interval embedding (in the 'edm' layout: map_layer0's rows of
  h), and the step lowers the loss on its batch (the same draws)."""
  base, layout = ('ncsnpp', dict(layout='edm')) if name == 'ncsnpp_edm' else (name, {})
  config = cifar10_meanflow.get_config()  # its objective: MeanFlow's CIFAR-10 setting
  config.model = ml_collections.ConfigDict(dict(NETWORKS[base][0], second_time=True, **layout))
  model = build_model(config.model)
  objective = make_objective(config, model)
  params = jax.tree.map(lambda p: 0.3 * p, _randomised(_init(base, second_time=True, **layout), seed=3))
  batch = {'image': jnp.asarray(np.random.default_rng(4).uniform(-1, 1, (4, 8, 8, 3)), jnp.float32)}
  value_and_grad = jax.jit(jax.value_and_grad(
      lambda p: objective.loss(p, {}, {}, batch, jax.random.PRNGKey(5), 0), has_aux=True))
  (value, metrics), grads = value_and_grad(params)
  assert np.isfinite(float(value)) and float(value) > 0 and float(metrics['dudt_norm']) > 0
  if layout:
    assert np.abs(np.asarray(grads['map_layer0']['kernel'][NETWORKS[base][2][1]:])).max() > 0
  else:
    for layer in ('dense_0', 'dense_1'):
      assert np.abs(np.asarray(grads['interval_embed'][layer]['kernel'])).max() > 0, layer
  tx = optax.adam(1e-4)
  updates, _ = tx.update(grads, tx.init(params), params)
  (after, _), _ = value_and_grad(optax.apply_updates(params, updates))
  assert float(after) < float(value)


# ----------------------------------------------------------------------------------------------------------------------
# NCSNpp's 'edm' layout with the second time is the MeanFlow PyTorch port's SongUNet (Gsunshine/py-meanflow
# models/unet.py): its reference here is test_checkpoints' PyTorch EDM SongUNet with the port's mapping.

PORT_RES = 8
PORT_CASES = {  # SongUNet constructor arguments
    # The port's CIFAR-10 network (models/model_configs.py 'unet') in small: positional sinusoids (endpoint=True),
    # channel_mult_noise 2, the [1, 3, 3, 1] filter, EDM's augmentation input (use_edm_aug: augment_dim 6).
    'ddpmpp': dict(model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], channel_mult_noise=2,
                   resample_filter=[1, 3, 3, 1], augment_dim=6),
    # NCSN++: t and h through the same Fourier frequencies (map_noise.freqs), the residual encoder.
    'ncsnpp': dict(model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4],
                   embedding_type='fourier', channel_mult_noise=2, encoder_type='residual',
                   resample_filter=[1, 3, 3, 1]),
}
PORT_ONE_LEVEL = dict(channel_mult=(1,), attn_resolutions=(8,))  # where the mapping alone is under test
# (t, r) with t - r != r in every example (one r = t, one r = 0).
PORT_T, PORT_R = np.array([0.9, 0.6, 0.35, 1.0], np.float32), np.array([0.2, 0.6, 0.05, 0.0], np.float32)


def _port_block(block, x, emb):
  """The port's UNetBlock.forward on an EDM reference block (test_checkpoints.UNetBlock): EDM's, but for its
  attention, QKVAttention's, which splits the qkv channels as (q|k|v, head, channel)."""
  import test_checkpoints as tc  # pylint: disable=g-import-not-at-top
  torch, F = tc.torch, tc.F
  orig = x
  x = F.silu(block.norm1(block.conv0(F.silu(block.norm0(x))) + block.affine(emb)[:, :, None, None]))
  x = (block.conv1(x) + (block.skip(orig) if block.skip is not None else orig)) * block.skip_scale
  if block.num_heads:
    b, c, hgt, wid = x.shape
    q, k, v = (t.reshape(b * block.num_heads, c // block.num_heads, hgt * wid)
               for t in block.qkv(block.norm2(x)).reshape(b, 3 * c, hgt * wid).chunk(3, dim=1))
    weights = torch.einsum('bct,bcs->bts', q, k / np.sqrt(q.shape[1])).softmax(dim=-1)
    a = torch.einsum('bts,bcs->bct', weights, v).reshape(b, c, hgt, wid)
    x = (block.proj(a) + x) * block.skip_scale
  return x


def _port_network(case, seed=0):
  """The port's SongUNet: EDM's (test_checkpoints.SongUNet) with map_layer0 and map_augment on [map_noise(t),
  map_noise(h)] and the port's blocks, called as the port's MeanFlow calls it, net(x, (t, h), aug_cond) with
  h = t - r."""
  import test_checkpoints as tc  # pylint: disable=g-import-not-at-top
  torch, F = tc.torch, tc.F

  class PortSongUNet(tc.SongUNet):

    def __init__(self, **kwargs):
      super().__init__(**kwargs)
      emb, noise = self.map_layer0.weight.shape
      self.map_layer0 = tc.Linear(2 * noise, emb)
      if self.map_augment is not None:
        self.map_augment = tc.Linear(self.map_augment.in_features, 2 * noise, bias=False)

    def forward(self, x, time_steps, aug_cond=None):
      t, h = time_steps
      swap = lambda e: e.reshape(e.shape[0], 2, -1).flip(1).reshape(*e.shape)  # sin/cos swap
      emb = torch.cat([swap(self.map_noise(t)), swap(self.map_noise(h))], dim=1)
      if self.map_augment is not None and aug_cond is not None:
        emb = emb + self.map_augment(aug_cond)
      emb = F.silu(self.map_layer1(F.silu(self.map_layer0(emb))))
      skips, aux = [], x  # from here on EDM's SongUNet.forward (the reference's) with the port's blocks
      for name, block in self.enc.items():
        if 'aux_residual' in name:
          x = skips[-1] = aux = (x + block(aux)) / np.sqrt(2)
        else:
          x = _port_block(block, x, emb) if isinstance(block, tc.UNetBlock) else block(x)
          skips.append(x)
      aux = tmp = None
      for name, block in self.dec.items():
        if 'aux_norm' in name:
          tmp = block(x)
        elif 'aux_conv' in name:
          tmp = block(F.silu(tmp))
          aux = tmp if aux is None else tmp + aux
        else:
          if x.shape[1] != block.in_channels:
            x = torch.cat([x, skips.pop()], dim=1)
          x = _port_block(block, x, emb)
      return aux

  torch.manual_seed(seed)
  return PortSongUNet(img_resolution=PORT_RES, in_channels=3, out_channels=3, **PORT_CASES[case]).eval()


def _port_fields(case, **fields):
  """The NCSNpp(layout='edm') config of the case's SongUNet arguments (as models.checkpoints reads EDM's)."""
  return dict(checkpoints._song_config(dict(checkpoints._SONG_DEFAULTS, **PORT_CASES[case])), **fields)


def _abstract(model):
  x = jnp.zeros((1, PORT_RES, PORT_RES, 3))
  return jax.eval_shape(lambda: model.init(jax.random.key(0), x, jnp.zeros((1,))))['params']


@pytest.mark.parametrize('case', sorted(PORT_CASES))
def test_the_edm_layout_with_second_time_is_the_meanflow_port(case):
  """u(z, r, t) = F(z, t, t - r) through objectives.meanflow.two_time, against the port's net(z, (t, t - r)) in
  float64 with its state dict read 1:1 (every tensor named as the port names it, no other), with and without
  augmentation labels; the reference tells t - r from r, so a network embedding r would fail, and the port's qkv
  split from EDM's."""
  torch = pytest.importorskip('torch')
  import test_checkpoints as tc  # pylint: disable=g-import-not-at-top
  net = _port_network(case)
  model = build_model(_port_fields(case, second_time=True))
  state = {k: v.numpy() for k, v in net.state_dict().items() if not k.endswith('resample_filter')}
  params = diffusers.from_diffusers(state, _abstract(model), 'the port network')  # raises on any name or shape
  assert len(_flat(params)) == len(state)
  rng = np.random.default_rng(7)
  z = rng.standard_normal((4, 3, PORT_RES, PORT_RES)).astype(np.float32)
  augment = rng.standard_normal((4, 6)).astype(np.float32)
  reference = _port_network(case).double()  # the same draws
  for aug in [None, augment] if net.map_augment is not None else [None]:
    extra = {} if aug is None else {'augment_labels': jnp.asarray(aug)}
    apply = lambda z, c_noise, interval: model.apply({'params': params}, z, c_noise, interval=interval, **extra)
    u = meanflow.two_time(FlowMatching(), apply)
    got = np.asarray(u(jnp.asarray(z.transpose(0, 2, 3, 1)), PORT_R, PORT_T)).transpose(0, 3, 1, 2)
    with torch.no_grad():
      t, r, a, zz = tc._torch(PORT_T, PORT_R, aug, z)
      want = reference(zz, (t, t - r), a).numpy()
      wrong = reference(zz, (t, r), a).numpy()  # r in place of t - r
      t32, r32, a32, z32 = tc._torch(PORT_T, PORT_R, aug, z, dtype=torch.float32)
      float32 = net(z32, (t32, t32 - r32), a32).numpy()
    for i in range(4):
      error, tolerance = tc._relative_error(got[i], want[i]), tc._tolerance(tc._relative_error(float32[i], want[i]))
      assert error < tolerance, (case, aug is not None, i, error, tolerance)
      assert tc._relative_error(wrong[i], want[i]) > 100 * tolerance, (case, i)


def test_the_edm_layout_zeros_interval_init_starts_as_the_one_time_network():
  """interval_init='zeros': at the same init map_layer0's kernel is the one-time network's with zero rows for h's
  sinusoids, all else the same; with the rest trained (random) and those rows fresh, F is the one-time network's
  for every h, the one-time (EDM's) network holding the same tensors with map_layer0's rows of h dropped and the qkv
  channels reordered from the port's (q|k|v, head, channel) to EDM's (head, channel, q|k|v). A fresh 'normal'
  map_layer0 already moves F with h; a one-time 'edm' network refuses an interval."""
  one = build_model(_port_fields('ddpmpp', **PORT_ONE_LEVEL))
  x = jnp.zeros((1, PORT_RES, PORT_RES, 3))
  init = lambda model: jax.jit(lambda: model.init({'params': jax.random.key(0)}, x, C_NOISE[:1])['params'])()
  one_params = _flat(init(one))
  fresh = _flat(init(build_model(_port_fields('ddpmpp', **PORT_ONE_LEVEL, second_time=True, interval_init='zeros'))))
  noise = one_params['map_layer0/kernel'].shape[0]
  assert set(fresh) == set(one_params) and fresh['map_layer0/kernel'].shape == (2 * noise, 64)
  np.testing.assert_array_equal(fresh['map_layer0/kernel'][:noise], one_params['map_layer0/kernel'])
  assert not np.any(fresh['map_layer0/kernel'][noise:])
  for k, v in one_params.items():
    if k not in ('map_layer0/kernel', 'map_augment/kernel'):  # map_augment's output widens with the sinusoids
      np.testing.assert_array_equal(fresh[k], v, err_msg=k)

  trained = _flat(_randomised(flax.traverse_util.unflatten_dict(fresh, sep='/'), seed=5))
  trained['map_layer0/kernel'] = trained['map_layer0/kernel'].at[noise:].set(0.0)
  edm_qkv = lambda v: v.reshape(v.shape[:-1] + (3, v.shape[-1] // 3)).swapaxes(-1, -2).reshape(v.shape)
  one_trained = {k: edm_qkv(v) if '/qkv/' in k else v for k, v in trained.items()}
  assert sum('/qkv/' in k for k in one_trained) == 3 * 2  # enc block0, dec in0 and block1: kernel and bias
  one_trained.update({'map_layer0/kernel': trained['map_layer0/kernel'][:noise],
                      'map_augment/kernel': trained['map_augment/kernel'][:, :noise]})
  x = jnp.asarray(np.random.default_rng(6).standard_normal((2, PORT_RES, PORT_RES, 3)), jnp.float32)
  unflat = lambda p: flax.traverse_util.unflatten_dict(p, sep='/')
  reference = _apply(one, unflat(one_trained), x)
  two = build_model(_port_fields('ddpmpp', **PORT_ONE_LEVEL, second_time=True, interval_init='zeros'))
  for h in (jnp.zeros(2), jnp.array([0.3, 0.9])):  # arrays both: one compile
    np.testing.assert_allclose(_apply(two, unflat(trained), x, h), reference, rtol=1e-6, atol=1e-6)

  normal = build_model(_port_fields('ddpmpp', **PORT_ONE_LEVEL, second_time=True))
  params = _flat(init(normal))
  assert np.all(np.abs(np.asarray(params['map_layer0/kernel'][noise:])).max(0) > 0)
  params = unflat(dict(trained, **{'map_layer0/kernel': params['map_layer0/kernel']}))
  a, b = _apply(normal, params, x, jnp.array([0.1, 0.2])), _apply(normal, params, x, jnp.array([0.5, 0.7]))
  assert np.all(np.abs(np.asarray(a - b)).reshape(2, -1).max(1) > 1e-4)
  with pytest.raises(ValueError, match='set model.second_time=True'):
    jax.eval_shape(lambda: one.init({'params': jax.random.key(0)}, x, C_NOISE, interval=jnp.zeros(2)))


def _count(model, shape):
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1,) + shape), jnp.zeros((1,)),
                                             jnp.zeros((1,), jnp.int32)))
  return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(shapes))


@pytest.mark.parametrize('arg,dims', [('b2', (12, 768, 12)), ('xl2', (48, 1024, 16))])
def test_imagenet256_imeanflow_builds_the_imf_shapes_with_the_cfg_scale_as_a_condition(arg, dims):
  """iMF-B/2 and iMF-XL/2: the official depth, width and heads, patch 2, 1000 classes dropped by the objective, the
  second time and the guidance input; the objective feeds the sampled CFG scale and the sampler's scale is in the
  trained range [1, 1 + cfg_scale_max]."""
  config = imagenet256_imeanflow.get_config(arg)
  model = build_model(config.model)
  assert (model.dims(), model.patch_size, model.num_classes, model.label_dropout) == (dims, 2, 1000, 0.0)
  assert model.second_time and model.guidance_embedding
  assert make_objective(config, model).feeds_guidance
  obj = config.objective
  assert (obj.flow_share, obj.norm_p, obj.norm_c, obj.cfg_scale_max, obj.class_dropout) == (0.5, 1.0, 0.01, 7.0, 0.1)
  assert 1.0 <= config.sampling.guidance_scale <= 1.0 + obj.cfg_scale_max
  assert config.latent.cache and config.optim.b2 == 0.95 and config.train.batch_size == 1024
  if arg == 'b2':  # DiT-B/2 plus the interval's timestep MLP and the guidance input's dense layer
    hidden = dims[1]
    plain = build_model(dict(name='dit', size='B', patch_size=2, num_classes=1000))
    assert _count(model, (32, 32, 4)) == (_count(plain, (32, 32, 4)) + (256 * hidden + hidden**2 + 2 * hidden)
                                          + (256 * hidden + hidden))
