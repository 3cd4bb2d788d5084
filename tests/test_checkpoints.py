"""EDM's network pickles load into cm_jax exactly (models/checkpoints.py, models/edm.py, formats/torch_pickle.py).

The reference is a PyTorch implementation of EDM's SongUNet / DhariwalUNet and its three preconditionings written
here from the structure of NVlabs/edm `training/networks.py` (EDM's code is CC BY-NC-SA and is not copied). Its
modules pickle the way EDM's `torch_utils.persistence` classes do: `_reconstruct_persistent_obj(meta)` with the
class name, the module's state and (here, a poisoned) module source, inside dict(ema=..., ...).
"""

import contextlib
import os
import pickle
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cm_jax import models
from cm_jax.formats import torch_pickle
from cm_jax.models import checkpoints

try:
  import torch  # pylint: disable=g-import-not-at-top
  F = torch.nn.functional
  Module = torch.nn.Module
except ImportError:  # the reference needs PyTorch; the tests named test_without_torch_* do not
  torch = F = None
  Module = object

DATA = os.path.join(os.path.dirname(__file__), 'data')

# What EDM's persistence wrapper would exec on a normal unpickling; the loader must never run it.
POISONED_SOURCE = "raise SystemExit('the pickled source code ran')"


def _reconstruct_persistent_obj(meta):
  raise AssertionError(f'the persistence hook ran for {meta["class_name"]}')


_PERSISTENCE = types.ModuleType('torch_utils.persistence')
_PERSISTENCE._reconstruct_persistent_obj = _reconstruct_persistent_obj
_reconstruct_persistent_obj.__module__ = 'torch_utils.persistence'


@contextlib.contextmanager
def _persistence_module():
  """A stand-in `torch_utils.persistence` module, so pickle names the hook as EDM's pickles do."""
  saved = {name: sys.modules.get(name) for name in ('torch_utils', 'torch_utils.persistence')}
  sys.modules['torch_utils'] = types.ModuleType('torch_utils')
  sys.modules['torch_utils.persistence'] = _PERSISTENCE
  try:
    yield
  finally:
    for name, module in saved.items():
      if module is None:
        sys.modules.pop(name, None)
      else:
        sys.modules[name] = module


def _dumps(obj) -> bytes:
  with _persistence_module():
    return pickle.dumps(obj)


# ----------------------------------------------------------------------------------------------------------------------
# The PyTorch reference (EDM's structure: module names, constructor arguments, forward passes).


@pytest.fixture(autouse=True)
def _skip_without_torch(request):
  if torch is None and not request.node.name.startswith('test_without_torch'):
    pytest.skip('needs PyTorch (the reference implementation)')


class Persistent(Module):
  """Pickles as EDM's persistent classes do, recording its constructor arguments."""

  def __init__(self, **kwargs):
    super().__init__()
    self._init_args, self._init_kwargs = (), dict(kwargs)

  def __reduce__(self):
    meta = dict(type='class', version=6, module_src=POISONED_SOURCE, class_name=type(self).__name__,
                state=dict(self.__dict__))
    return _reconstruct_persistent_obj, (meta,)


class Linear(Persistent):

  def __init__(self, cin, cout, bias=True):
    super().__init__(in_features=cin, out_features=cout, bias=bias)
    self.in_features = cin
    self.weight = torch.nn.Parameter(torch.randn(cout, cin) / np.sqrt(cin))
    self.bias = torch.nn.Parameter(0.1 * torch.randn(cout)) if bias else None

  def forward(self, x):
    x = x @ self.weight.t()
    return x if self.bias is None else x + self.bias


def _fir(taps):
  f = torch.as_tensor(taps, dtype=torch.float32)
  return (torch.outer(f, f) / f.sum() ** 2)[None, None]


class Conv2d(Persistent):

  def __init__(self, cin, cout, kernel, bias=True, up=False, down=False, resample_filter=(1, 1), fused=False):
    super().__init__(in_channels=cin, out_channels=cout, kernel=kernel)
    self.cin, self.cout, self.up, self.down, self.fused = cin, cout, up, down, fused
    self.weight = torch.nn.Parameter(torch.randn(cout, cin, kernel, kernel) / np.sqrt(cin * kernel**2)) if kernel \
        else None
    self.bias = torch.nn.Parameter(0.1 * torch.randn(cout)) if kernel and bias else None
    self.register_buffer('resample_filter', _fir(resample_filter) if up or down else None)

  def forward(self, x):
    w, f = self.weight, self.resample_filter
    w_pad = w.shape[-1] // 2 if w is not None else 0
    f_pad = (f.shape[-1] - 1) // 2 if f is not None else 0
    if self.fused and self.down and w is not None:
      x = F.conv2d(x, w, padding=w_pad + f_pad)
      x = F.conv2d(x, f.tile([self.cout, 1, 1, 1]), groups=self.cout, stride=2)
    else:
      if self.up:
        x = F.conv_transpose2d(x, (4 * f).tile([self.cin, 1, 1, 1]), groups=self.cin, stride=2, padding=f_pad)
      if self.down:
        x = F.conv2d(x, f.tile([self.cin, 1, 1, 1]), groups=self.cin, stride=2, padding=f_pad)
      if w is not None:
        x = F.conv2d(x, w, padding=w_pad)
    return x if self.bias is None else x + self.bias.reshape(1, -1, 1, 1)


class GroupNorm(Persistent):

  def __init__(self, channels, eps=1e-5):
    super().__init__(num_channels=channels, eps=eps)
    self.groups, self.eps = min(32, channels // 4), eps
    self.weight = torch.nn.Parameter(1 + 0.1 * torch.randn(channels))
    self.bias = torch.nn.Parameter(0.1 * torch.randn(channels))

  def forward(self, x):
    return F.group_norm(x, self.groups, self.weight, self.bias, self.eps)


class UNetBlock(Persistent):

  def __init__(self, cin, cout, emb, up=False, down=False, attention=False, num_heads=None, channels_per_head=64,
               skip_scale=1.0, eps=1e-5, resample_filter=(1, 1), resample_proj=False, adaptive_scale=True, **unused):
    super().__init__(in_channels=cin, out_channels=cout)
    self.in_channels, self.skip_scale, self.adaptive_scale = cin, skip_scale, adaptive_scale
    self.num_heads = 0 if not attention else num_heads if num_heads is not None else cout // channels_per_head
    self.norm0 = GroupNorm(cin, eps)
    self.conv0 = Conv2d(cin, cout, 3, up=up, down=down, resample_filter=resample_filter)
    self.affine = Linear(emb, cout * (2 if adaptive_scale else 1))
    self.norm1 = GroupNorm(cout, eps)
    self.conv1 = Conv2d(cout, cout, 3)
    self.skip = None
    if cout != cin or up or down:
      kernel = 1 if resample_proj or cout != cin else 0
      self.skip = Conv2d(cin, cout, kernel, up=up, down=down, resample_filter=resample_filter)
    if self.num_heads:
      self.norm2 = GroupNorm(cout, eps)
      self.qkv = Conv2d(cout, 3 * cout, 1)
      self.proj = Conv2d(cout, cout, 1)

  def forward(self, x, emb):
    orig = x
    x = self.conv0(F.silu(self.norm0(x)))
    params = self.affine(emb)[:, :, None, None]
    if self.adaptive_scale:
      scale, shift = params.chunk(2, dim=1)
      x = F.silu(shift + self.norm1(x) * (scale + 1))
    else:
      x = F.silu(self.norm1(x + params))
    x = self.conv1(x)
    x = (x + (self.skip(orig) if self.skip is not None else orig)) * self.skip_scale
    if self.num_heads:
      b, c, h, w = x.shape
      q, k, v = self.qkv(self.norm2(x)).reshape(b * self.num_heads, c // self.num_heads, 3, -1).unbind(2)
      weights = torch.einsum('ncq,nck->nqk', q, k / np.sqrt(k.shape[1])).softmax(dim=2)
      a = torch.einsum('nqk,nck->ncq', weights, v)
      x = (self.proj(a.reshape(b, c, h, w)) + x) * self.skip_scale
    return x


class PositionalEmbedding(Persistent):

  def __init__(self, channels, endpoint=False):
    super().__init__(num_channels=channels, endpoint=endpoint)
    self.channels, self.endpoint = channels, endpoint

  def forward(self, x):
    half = self.channels // 2
    freqs = (1 / 10000) ** (torch.arange(half, dtype=x.dtype) / (half - (1 if self.endpoint else 0)))
    x = torch.outer(x, freqs)
    return torch.cat([x.cos(), x.sin()], dim=1)


class FourierEmbedding(Persistent):

  def __init__(self, channels, scale=16):
    super().__init__(num_channels=channels)
    self.register_buffer('freqs', torch.randn(channels // 2) * scale)

  def forward(self, x):
    x = torch.outer(x, 2 * np.pi * self.freqs)
    return torch.cat([x.cos(), x.sin()], dim=1)


class SongUNet(Persistent):

  def __init__(self, img_resolution, in_channels, out_channels, label_dim=0, augment_dim=0, model_channels=128,
               channel_mult=(1, 2, 2, 2), channel_mult_emb=4, num_blocks=4, attn_resolutions=(16,), dropout=0.1,
               label_dropout=0, embedding_type='positional', channel_mult_noise=1, encoder_type='standard',
               decoder_type='standard', resample_filter=(1, 1)):
    kw = {k: v for k, v in locals().items() if k not in ('self', '__class__')}
    super().__init__(**kw)
    emb, noise = model_channels * channel_mult_emb, model_channels * channel_mult_noise
    block = dict(emb=emb, num_heads=1, skip_scale=np.sqrt(0.5), eps=1e-6, resample_filter=resample_filter,
                 resample_proj=True, adaptive_scale=False)
    self.map_noise = (PositionalEmbedding(noise, endpoint=True) if embedding_type == 'positional'
                      else FourierEmbedding(noise))
    self.map_label = Linear(label_dim, noise) if label_dim else None
    self.map_augment = Linear(augment_dim, noise, bias=False) if augment_dim else None
    self.map_layer0 = Linear(noise, emb)
    self.map_layer1 = Linear(emb, emb)
    self.enc = torch.nn.ModuleDict()
    cout = caux = in_channels
    for level, mult in enumerate(channel_mult):
      res = img_resolution >> level
      if level == 0:
        cin, cout = cout, model_channels
        self.enc[f'{res}x{res}_conv'] = Conv2d(cin, cout, 3)
      else:
        self.enc[f'{res}x{res}_down'] = UNetBlock(cout, cout, down=True, **block)
        if encoder_type == 'residual':
          self.enc[f'{res}x{res}_aux_residual'] = Conv2d(caux, cout, 3, down=True, resample_filter=resample_filter,
                                                         fused=True)
          caux = cout
      for idx in range(num_blocks):
        cin, cout = cout, model_channels * mult
        self.enc[f'{res}x{res}_block{idx}'] = UNetBlock(cin, cout, attention=res in attn_resolutions, **block)
    skips = [b.cout if isinstance(b, Conv2d) else b.conv1.cout for n, b in self.enc.items() if 'aux' not in n]
    self.dec = torch.nn.ModuleDict()
    for level, mult in reversed(list(enumerate(channel_mult))):
      res = img_resolution >> level
      if level == len(channel_mult) - 1:
        self.dec[f'{res}x{res}_in0'] = UNetBlock(cout, cout, attention=True, **block)
        self.dec[f'{res}x{res}_in1'] = UNetBlock(cout, cout, **block)
      else:
        self.dec[f'{res}x{res}_up'] = UNetBlock(cout, cout, up=True, **block)
      for idx in range(num_blocks + 1):
        cin, cout = cout + skips.pop(), model_channels * mult
        attend = idx == num_blocks and res in attn_resolutions
        self.dec[f'{res}x{res}_block{idx}'] = UNetBlock(cin, cout, attention=attend, **block)
      if decoder_type == 'skip' or level == 0:
        if decoder_type == 'skip' and level < len(channel_mult) - 1:
          self.dec[f'{res}x{res}_aux_up'] = Conv2d(out_channels, out_channels, 0, up=True,
                                                   resample_filter=resample_filter)
        self.dec[f'{res}x{res}_aux_norm'] = GroupNorm(cout, eps=1e-6)
        self.dec[f'{res}x{res}_aux_conv'] = Conv2d(cout, out_channels, 3)

  def forward(self, x, noise_labels, class_labels, augment_labels=None):
    emb = self.map_noise(noise_labels)
    emb = emb.reshape(emb.shape[0], 2, -1).flip(1).reshape(*emb.shape)
    if self.map_label is not None:
      emb = emb + self.map_label(class_labels * np.sqrt(self.map_label.in_features))
    if self.map_augment is not None and augment_labels is not None:
      emb = emb + self.map_augment(augment_labels)
    emb = F.silu(self.map_layer1(F.silu(self.map_layer0(emb))))
    skips, aux = [], x
    for name, block in self.enc.items():
      if 'aux_residual' in name:
        x = skips[-1] = aux = (x + block(aux)) / np.sqrt(2)
      else:
        x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
        skips.append(x)
    aux = tmp = None
    for name, block in self.dec.items():
      if 'aux_up' in name:
        aux = block(aux)
      elif 'aux_norm' in name:
        tmp = block(x)
      elif 'aux_conv' in name:
        tmp = block(F.silu(tmp))
        aux = tmp if aux is None else tmp + aux
      else:
        if x.shape[1] != block.in_channels:
          x = torch.cat([x, skips.pop()], dim=1)
        x = block(x, emb)
    return aux


class DhariwalUNet(Persistent):

  def __init__(self, img_resolution, in_channels, out_channels, label_dim=0, augment_dim=0, model_channels=192,
               channel_mult=(1, 2, 3, 4), channel_mult_emb=4, num_blocks=3, attn_resolutions=(32, 16, 8),
               dropout=0.1, label_dropout=0):
    kw = {k: v for k, v in locals().items() if k not in ('self', '__class__')}
    super().__init__(**kw)
    emb = model_channels * channel_mult_emb
    block = dict(emb=emb, channels_per_head=64)
    self.map_noise = PositionalEmbedding(model_channels)
    self.map_augment = Linear(augment_dim, model_channels, bias=False) if augment_dim else None
    self.map_layer0 = Linear(model_channels, emb)
    self.map_layer1 = Linear(emb, emb)
    self.map_label = Linear(label_dim, emb, bias=False) if label_dim else None
    self.enc = torch.nn.ModuleDict()
    cout = in_channels
    for level, mult in enumerate(channel_mult):
      res = img_resolution >> level
      if level == 0:
        cin, cout = cout, model_channels * mult
        self.enc[f'{res}x{res}_conv'] = Conv2d(cin, cout, 3)
      else:
        self.enc[f'{res}x{res}_down'] = UNetBlock(cout, cout, down=True, **block)
      for idx in range(num_blocks):
        cin, cout = cout, model_channels * mult
        self.enc[f'{res}x{res}_block{idx}'] = UNetBlock(cin, cout, attention=res in attn_resolutions, **block)
    skips = [b.cout if isinstance(b, Conv2d) else b.conv1.cout for b in self.enc.values()]
    self.dec = torch.nn.ModuleDict()
    for level, mult in reversed(list(enumerate(channel_mult))):
      res = img_resolution >> level
      if level == len(channel_mult) - 1:
        self.dec[f'{res}x{res}_in0'] = UNetBlock(cout, cout, attention=True, **block)
        self.dec[f'{res}x{res}_in1'] = UNetBlock(cout, cout, **block)
      else:
        self.dec[f'{res}x{res}_up'] = UNetBlock(cout, cout, up=True, **block)
      for idx in range(num_blocks + 1):
        cin, cout = cout + skips.pop(), model_channels * mult
        self.dec[f'{res}x{res}_block{idx}'] = UNetBlock(cin, cout, attention=res in attn_resolutions, **block)
    self.out_norm = GroupNorm(cout)
    self.out_conv = Conv2d(cout, out_channels, 3)

  def forward(self, x, noise_labels, class_labels, augment_labels=None):
    emb = self.map_noise(noise_labels)
    if self.map_augment is not None and augment_labels is not None:
      emb = emb + self.map_augment(augment_labels)
    emb = self.map_layer1(F.silu(self.map_layer0(emb)))
    if self.map_label is not None:
      emb = emb + self.map_label(class_labels)
    emb = F.silu(emb)
    skips = []
    for block in self.enc.values():
      x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
      skips.append(x)
    for block in self.dec.values():
      if x.shape[1] != block.in_channels:
        x = torch.cat([x, skips.pop()], dim=1)
      x = block(x, emb)
    return self.out_conv(F.silu(self.out_norm(x)))


class Precond(Persistent):
  """EDMPrecond / VPPrecond / VEPrecond (the subclasses), with the network as `model`."""

  def __init__(self, img_resolution, img_channels, label_dim=0, use_fp16=False, model_type='SongUNet', **kwargs):
    consts = {k: kwargs.pop(k) for k in list(kwargs) if k in self.CONSTANTS}
    super().__init__(img_resolution=img_resolution, img_channels=img_channels, label_dim=label_dim,
                     use_fp16=use_fp16, model_type=model_type, **consts, **kwargs)
    self.img_resolution, self.img_channels, self.label_dim, self.use_fp16 = (img_resolution, img_channels, label_dim,
                                                                             use_fp16)
    for key, default in self.CONSTANTS.items():
      setattr(self, key, consts.get(key, default))
    self.setup()
    network = {'SongUNet': SongUNet, 'DhariwalUNet': DhariwalUNet}[model_type]
    self.model = network(img_resolution=img_resolution, in_channels=img_channels, out_channels=img_channels,
                         label_dim=label_dim, **kwargs)

  def setup(self):
    pass

  def forward(self, x, sigma, class_labels=None, augment_labels=None):
    sigma = sigma.reshape(-1, 1, 1, 1)
    if self.label_dim:
      class_labels = torch.zeros([1, self.label_dim], dtype=x.dtype) if class_labels is None else class_labels
    c_skip, c_out, c_in, c_noise = self.scalings(sigma)
    return c_skip * x + c_out * self.model(c_in * x, c_noise.flatten(), class_labels, augment_labels)


class EDMPrecond(Precond):
  CONSTANTS = dict(sigma_min=0, sigma_max=float('inf'), sigma_data=0.5)

  def scalings(self, sigma):
    sd = self.sigma_data
    return (sd**2 / (sigma**2 + sd**2), sigma * sd / (sigma**2 + sd**2).sqrt(), 1 / (sd**2 + sigma**2).sqrt(),
            sigma.log() / 4)


class VPPrecond(Precond):
  CONSTANTS = dict(beta_d=19.9, beta_min=0.1, M=1000, epsilon_t=1e-5)

  def setup(self):
    self.sigma_min = float(self.sigma(self.epsilon_t))
    self.sigma_max = float(self.sigma(1))

  def sigma(self, t):
    t = torch.as_tensor(t)
    return ((0.5 * self.beta_d * t**2 + self.beta_min * t).exp() - 1).sqrt()

  def sigma_inv(self, sigma):
    return ((self.beta_min**2 + 2 * self.beta_d * (1 + sigma**2).log()).sqrt() - self.beta_min) / self.beta_d

  def scalings(self, sigma):
    return 1, -sigma, 1 / (sigma**2 + 1).sqrt(), (self.M - 1) * self.sigma_inv(sigma)


class VEPrecond(Precond):
  CONSTANTS = dict(sigma_min=0.02, sigma_max=100)

  def scalings(self, sigma):
    return 1, sigma, 1, (0.5 * sigma).log()


class iDDPMPrecond(Precond):  # pylint: disable=invalid-name
  CONSTANTS = dict(C_1=0.001, C_2=0.008, M=1000)


# ----------------------------------------------------------------------------------------------------------------------

RES = 16
CASES = {
    # EDM's DDPM++ (VP): positional embedding, [1, 1] filter, class and augmentation labels.
    'ddpmpp_vp': (VPPrecond, dict(model_type='SongUNet', label_dim=4, augment_dim=9, model_channels=16,
                                  channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8])),
    # EDM's NCSN++ (VE): Fourier embedding, residual encoder, [1, 3, 3, 1] filter, unconditional.
    'ncsnpp_ve': (VEPrecond, dict(model_type='SongUNet', model_channels=16, channel_mult=[1, 2], num_blocks=1,
                                  attn_resolutions=[8], embedding_type='fourier', channel_mult_noise=2,
                                  encoder_type='residual', resample_filter=[1, 3, 3, 1])),
    # NCSN++ with the progressive 'skip' decoder over three levels, class labels, EDM preconditioning.
    'ncsnpp_skip_edm': (EDMPrecond, dict(model_type='SongUNet', label_dim=3, model_channels=16,
                                         channel_mult=[1, 2, 2], num_blocks=2, attn_resolutions=[8],
                                         embedding_type='fourier', channel_mult_noise=2, encoder_type='residual',
                                         decoder_type='skip', resample_filter=[1, 3, 3, 1], sigma_data=0.6)),
    # EDM's ADM: channel_mult[0] = 2, no attention at 32 channels (< 64 per head), one head at 64, two at 128.
    'adm_edm': (EDMPrecond, dict(model_type='DhariwalUNet', label_dim=5, augment_dim=9, model_channels=16,
                                 channel_mult=[2, 4, 8], num_blocks=1, attn_resolutions=[16, 8, 4])),
}
SIGMAS = np.array([0.002, 0.3, 2.5, 80.0], np.float32)
LABELS = np.array([0, 2, -1, 1])


def _network(case, seed=0):
  torch.manual_seed(seed)
  cls, kwargs = CASES[case]
  return cls(img_resolution=RES, img_channels=3, **kwargs).eval()


def _snapshot(net) -> bytes:
  """EDM's network-snapshot pickle of `net`."""
  return _dumps(dict(ema=net, loss_fn=None, augment_pipe=None, dataset_kwargs=dict(resolution=RES)))


@pytest.fixture(scope='module', params=sorted(CASES))
def loaded(request, tmp_path_factory):
  """(case, torch network, load_edm result) of a snapshot written to a file."""
  pytest.importorskip('torch')
  net = _network(request.param)
  path = tmp_path_factory.mktemp('edm') / f'{request.param}.pkl'
  path.write_bytes(_snapshot(net))
  return request.param, net, checkpoints.load_edm(path)


def _inputs(net, batch_size=4, seed=1):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((batch_size, 3, RES, RES)).astype(np.float32)
  label_dim, labels = net.label_dim, LABELS[:batch_size]
  onehot = np.zeros((batch_size, label_dim), np.float32)  # EDM's class vectors; all zeros: no label
  for i, label in enumerate(labels):
    if label >= 0 and label_dim:
      onehot[i, label] = 1
  augment_dim = net.model._init_kwargs.get('augment_dim', 0)
  augment = rng.standard_normal((batch_size, augment_dim)).astype(np.float32) if augment_dim else None
  return x, labels if label_dim else None, onehot if label_dim else None, augment


def _relative_error(got, want):
  return float(np.max(np.abs(np.asarray(got) - want)) / np.max(np.abs(want)))


def _torch(*arrays, dtype=None):
  return [None if a is None else torch.from_numpy(a).to(dtype or torch.float64) for a in arrays]


def _tolerance(float32_error):
  """1e-5 relative, or 3x the float32 reference's own distance from float64 where float32 cannot do 1e-5 (VP's
  positional embedding of c_noise = 999 t ~ 850: an angle resolved to 850 * 2^-24 = 5e-5)."""
  return max(1e-5, 3 * float32_error)


def test_the_denoiser_matches_edm(loaded):
  """cm_jax's float32 D(x; sigma) against the reference in float64, per sample, with and without augmentation
  labels. (The float32 reference is as far from float64: BUILD_NOTES.)"""
  case, net, edm_net = loaded
  x, labels, onehot, augment = _inputs(net)
  reference = _network(case).double()
  for aug in ([None, augment] if augment is not None else [None]):
    with torch.no_grad():
      want = reference(*_torch(x, SIGMAS, onehot, aug)).numpy()
      float32 = net(*_torch(x, SIGMAS, onehot, aug, dtype=torch.float32)).numpy()
    got = np.asarray(edm_net.denoise(x.transpose(0, 2, 3, 1), SIGMAS, labels, aug)).transpose(0, 3, 1, 2)
    for i, sigma in enumerate(SIGMAS):
      error, tolerance = _relative_error(got[i], want[i]), _tolerance(_relative_error(float32[i], want[i]))
      assert error < tolerance, (case, aug is not None, sigma, error, tolerance)


def test_the_network_output_matches_edm(loaded):
  """F(c_in x, c_noise, labels): the network alone, where c_skip x cannot hide an error."""
  case, net, edm_net = loaded
  x, labels, onehot, augment = _inputs(net, seed=2)
  c_noise = np.array([-1.5, 0.0, 0.7, 900.0 if case == 'ddpmpp_vp' else 1.1], np.float32)
  with torch.no_grad():
    want = _network(case).double().model(*_torch(x, c_noise, onehot, augment)).numpy()
    float32 = net.model(*_torch(x, c_noise, onehot, augment, dtype=torch.float32)).numpy()
  model = models.build_model(edm_net.model_config)
  extra = {} if augment is None else {'augment_labels': jnp.asarray(augment)}
  got = model.apply({'params': edm_net.params}, jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(c_noise),
                    None if labels is None else jnp.asarray(labels), **extra)
  got = np.asarray(got).transpose(0, 3, 1, 2)
  for i in range(len(c_noise)):
    error, tolerance = _relative_error(got[i], want[i]), _tolerance(_relative_error(float32[i], want[i]))
    assert error < tolerance, (case, c_noise[i], error, tolerance)


def test_config_and_preconditioning(loaded):
  case, net, edm_net = loaded
  config, params, precond = edm_net  # unpacks as (model_config, params, preconditioning)
  assert config['layout'] == 'edm' and config['name'] == ('adm' if 'adm' in case else 'ncsnpp')
  assert precond['name'] == {'VPPrecond': 'vp', 'VEPrecond': 've', 'EDMPrecond': 'edm'}[type(net).__name__]
  assert precond['resolution'] == RES and precond['channels'] == 3
  if precond['name'] == 'vp':
    assert precond['sigma_min'] == pytest.approx(net.sigma_min) and precond['beta_d'] == 19.9
  if precond['name'] == 'edm':
    assert precond['sigma_data'] == net.sigma_data and precond['sigma_max'] == float('inf')
  # Every tensor of the network has its place, and nothing else is there (resample filters are constants).
  state = {k: v for k, v in net.model.state_dict().items() if not k.endswith('resample_filter')}
  flat = jax.tree_util.tree_leaves_with_path(params)
  assert len(flat) == len(state)
  assert sum(np.size(v) for _, v in flat) == sum(v.numel() for v in state.values())


def test_fourier_frequencies_are_read_and_never_trained(tmp_path):
  net = _network('ncsnpp_ve')
  path = tmp_path / 'net.pkl'
  path.write_bytes(_snapshot(net))
  edm_net = checkpoints.load_edm(path)
  np.testing.assert_array_equal(edm_net.params['map_noise']['freqs'], net.model.map_noise.freqs.numpy())
  model = models.build_model(edm_net.model_config)
  x = jnp.ones((1, RES, RES, 3))
  grads = jax.grad(lambda p: jnp.sum(model.apply({'params': p}, x, jnp.array([0.3])) ** 2))(edm_net.params)
  assert not np.any(grads['map_noise']['freqs']) and np.any(grads['map_layer0']['kernel'])


def test_without_torch_default_layout_is_unchanged():
  """The 'edm' layout is an option: the default NCSNpp / ADM parameter trees are cm_jax's own."""
  for name in ('ncsnpp', 'adm'):
    model = models.build_model(dict(name=name, channels=16, channel_mult=(1, 2), num_res_blocks=1,
                                    attn_resolutions=(8,), num_classes=0))
    tree = jax.eval_shape(lambda m=model: m.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)), jnp.zeros((1,))))
    assert 'embed' in tree['params'] and 'map_layer0' not in tree['params']
  with pytest.raises(ValueError, match="layout='edm'"):
    models.build_model(dict(name='ncsnpp', augment_dim=9)).init(
        jax.random.key(0), jnp.zeros((1, 16, 16, 3)), jnp.zeros((1,)))


# ----------------------------------------------------------------------------------------------------------------------
# Bad input and the restricted unpickler.

class _Evil:

  def __reduce__(self):
    return os.system, ('echo the pickle ran a command',)


def test_without_torch_a_pickle_that_runs_code_is_refused(tmp_path):
  path = tmp_path / 'evil.pkl'
  path.write_bytes(pickle.dumps(dict(ema=_Evil())))
  with pytest.raises(ValueError, match=r'refusing the global (posix|os|nt)\.system') as info:
    checkpoints.load_edm(path)
  assert '\n' not in str(info.value)


def test_the_embedded_source_is_never_run(tmp_path):
  """The snapshot's modules carry POISONED_SOURCE and a hook that raises: loading runs neither."""
  path = tmp_path / 'net.pkl'
  path.write_bytes(_snapshot(_network('ddpmpp_vp')))
  obj = torch_pickle.load_module_pickle(path)
  assert isinstance(obj['ema'], torch_pickle.PersistentObject) and obj['ema'].class_name == 'VPPrecond'
  assert 'module_src' not in obj['ema'].state


# A committed EDM pickle written by the reference (`python tests/test_checkpoints.py` rewrites it): NCSN++ (Fourier,
# residual encoder, [1, 3, 3, 1]) with class and augmentation labels under EDMPrecond, 8x8 images, and its float64
# outputs, so the loader is tested without PyTorch.
FIXTURE_CASE = (EDMPrecond, dict(model_type='SongUNet', label_dim=3, augment_dim=2, model_channels=4,
                                 channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], embedding_type='fourier',
                                 channel_mult_noise=2, encoder_type='residual', resample_filter=[1, 3, 3, 1]))
FIXTURE = os.path.join(DATA, 'tiny_edm_ncsnpp.pkl')
FIXTURE_OUTPUTS = os.path.join(DATA, 'tiny_edm_ncsnpp_outputs.npz')


def _write_fixture():
  torch.manual_seed(0)
  cls, kwargs = FIXTURE_CASE
  net = cls(img_resolution=8, img_channels=3, **kwargs).eval()
  with open(FIXTURE, 'wb') as f:
    f.write(_dumps(dict(ema=net, loss_fn=None, augment_pipe=None, dataset_kwargs=dict(resolution=8))))
  rng = np.random.default_rng(0)
  x = rng.standard_normal((4, 3, 8, 8)).astype(np.float32)
  labels, onehot = np.array([0, 2, -1, 1]), np.zeros((4, 3), np.float32)
  onehot[[0, 1, 3], [0, 2, 1]] = 1
  augment = rng.standard_normal((4, 2)).astype(np.float32)
  with torch.no_grad():
    d = net.double()(*_torch(x, SIGMAS, onehot, augment)).numpy()
  np.savez(FIXTURE_OUTPUTS, x=x.transpose(0, 2, 3, 1), sigma=SIGMAS, labels=labels, augment=augment,
           denoised=d.transpose(0, 2, 3, 1))


def test_without_torch_a_committed_edm_pickle_loads(tmp_path):
  expected = np.load(FIXTURE_OUTPUTS)
  edm_net = checkpoints.load_edm(FIXTURE)
  assert edm_net.preconditioning['name'] == 'edm' and edm_net.model_config['augment_dim'] == 2
  got = np.asarray(edm_net.denoise(expected['x'], expected['sigma'], expected['labels'], expected['augment']))
  for i in range(len(got)):
    assert _relative_error(got[i], expected['denoised'][i]) < 1e-5, expected['sigma'][i]
  data = open(FIXTURE, 'rb').read()
  (tmp_path / 'truncated.pkl').write_bytes(data[:len(data) * 2 // 3])
  with pytest.raises(ValueError, match='is not a readable pickle of PyTorch modules'):
    checkpoints.load_edm(tmp_path / 'truncated.pkl')


def test_without_torch_missing_file(tmp_path):
  with pytest.raises(FileNotFoundError, match='No file at'):
    checkpoints.load_edm(tmp_path / 'nothing.pkl')


def test_truncated_pickle(tmp_path):
  data = _snapshot(_network('ncsnpp_ve'))
  path = tmp_path / 'truncated.pkl'
  path.write_bytes(data[:len(data) // 2])
  with pytest.raises(ValueError, match='is not a readable pickle of PyTorch modules') as info:
    checkpoints.load_edm(path)
  assert '\n' not in str(info.value)
  path.write_bytes(b'not a pickle at all')
  with pytest.raises(ValueError, match='is not a readable pickle'):
    checkpoints.load_edm(path)


def test_unknown_network_classes_are_named(tmp_path):
  path = tmp_path / 'net.pkl'
  path.write_bytes(_dumps(dict(ema=iDDPMPrecond(img_resolution=RES, img_channels=3, model_type='DhariwalUNet',
                                                model_channels=16, channel_mult=[1], num_blocks=1,
                                                attn_resolutions=[]))))
  with pytest.raises(ValueError, match="'ema' network is an object of class iDDPMPrecond"):
    checkpoints.load_edm(path)
  net = _network('ncsnpp_ve')
  net.model.__class__ = type('StyleGAN2', (SongUNet,), {})
  path.write_bytes(_snapshot(net))
  with pytest.raises(ValueError, match='wraps an object of class StyleGAN2'):
    checkpoints.load_edm(path)
  path.write_bytes(_dumps(dict(G_ema=net)))
  with pytest.raises(ValueError, match=r"not an EDM network snapshot .* a dict with keys \['G_ema'\]"):
    checkpoints.load_edm(path)


def test_a_tensor_that_does_not_fit_is_named(tmp_path):
  net = _network('ncsnpp_ve')
  net.model.map_layer1.weight = torch.nn.Parameter(torch.zeros(5, 7))
  path = tmp_path / 'net.pkl'
  path.write_bytes(_snapshot(net))
  with pytest.raises(ValueError, match=r'model\.map_layer1\.weight has shape \(5, 7\)'):
    checkpoints.load_edm(path)


# ----------------------------------------------------------------------------------------------------------------------
# The CM paper's guided-diffusion UNet (openai/consistency_models cm/unet.py): a PyTorch reference of its structure
# and names, saved as a torch.save state dict, read by load_cm. (cm/unet.py runs its attention in float16; the
# reference runs it in float64, the exact function.)


class GDResBlock(Module):

  def __init__(self, cin, emb, cout, scale_shift, up=False, down=False):
    super().__init__()
    self.scale_shift, self.up, self.down = scale_shift, up, down
    self.in_layers = torch.nn.Sequential(torch.nn.GroupNorm(32, cin), torch.nn.SiLU(),
                                         torch.nn.Conv2d(cin, cout, 3, padding=1))
    self.emb_layers = torch.nn.Sequential(torch.nn.SiLU(), torch.nn.Linear(emb, cout * (2 if scale_shift else 1)))
    self.out_layers = torch.nn.Sequential(torch.nn.GroupNorm(32, cout), torch.nn.SiLU(), torch.nn.Dropout(0.0),
                                          torch.nn.Conv2d(cout, cout, 3, padding=1))
    self.skip_connection = torch.nn.Identity() if cin == cout else torch.nn.Conv2d(cin, cout, 1)

  def forward(self, x, emb):
    h = self.in_layers[1](self.in_layers[0](x))
    if self.up or self.down:
      resample = (lambda t: F.interpolate(t, scale_factor=2, mode='nearest')) if self.up else (
          lambda t: F.avg_pool2d(t, 2))
      h, x = resample(h), resample(x)
    h = self.in_layers[2](h)
    emb_out = self.emb_layers(emb)[:, :, None, None]
    if self.scale_shift:
      scale, shift = emb_out.chunk(2, dim=1)
      h = self.out_layers[0](h) * (1 + scale) + shift
    else:
      h = self.out_layers[0](h + emb_out)
    h = self.out_layers[3](self.out_layers[2](self.out_layers[1](h)))
    return self.skip_connection(x) + h


class GDAttention(Module):

  def __init__(self, channels, head_channels):
    super().__init__()
    self.heads = channels // head_channels
    self.norm = torch.nn.GroupNorm(32, channels)
    self.qkv = torch.nn.Conv2d(channels, 3 * channels, 1)
    self.proj_out = torch.nn.Conv2d(channels, channels, 1)

  def forward(self, x):
    b, c, h, w = x.shape
    qkv = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w)  # b (three h d) s
    q, k, v = qkv.unbind(1)
    weights = torch.einsum('bhds,bhdt->bhst', q, k / np.sqrt(c // self.heads)).softmax(dim=-1)
    a = torch.einsum('bhst,bhdt->bhds', weights, v).reshape(b, c, h, w)
    return x + self.proj_out(a)


class GDDownsample(Module):

  def __init__(self, channels):
    super().__init__()
    self.op = torch.nn.Conv2d(channels, channels, 3, stride=2, padding=1)

  def forward(self, x):
    return self.op(x)


class GDUpsample(Module):

  def __init__(self, channels):
    super().__init__()
    self.conv = torch.nn.Conv2d(channels, channels, 3, padding=1)

  def forward(self, x):
    return self.conv(F.interpolate(x, scale_factor=2, mode='nearest'))


class GDUNet(Module):

  def __init__(self, image_size, channels, num_res_blocks, attention_resolutions, channel_mult, num_classes,
               head_channels, scale_shift, resblock_updown):
    super().__init__()
    self.channels = channels
    emb = 4 * channels
    self.time_embed = torch.nn.Sequential(torch.nn.Linear(channels, emb), torch.nn.SiLU(), torch.nn.Linear(emb, emb))
    if num_classes:
      self.label_emb = torch.nn.Embedding(num_classes, emb)
    block = lambda cin, cout, **kw: GDResBlock(cin, emb, cout, scale_shift, **kw)
    ch = channel_mult[0] * channels
    self.input_blocks = torch.nn.ModuleList([torch.nn.ModuleList([torch.nn.Conv2d(3, ch, 3, padding=1)])])
    chans, ds = [ch], 1
    for level, mult in enumerate(channel_mult):
      for _ in range(num_res_blocks):
        layers = [block(ch, mult * channels)]
        ch = mult * channels
        if image_size // ds in attention_resolutions:
          layers.append(GDAttention(ch, head_channels))
        self.input_blocks.append(torch.nn.ModuleList(layers))
        chans.append(ch)
      if level != len(channel_mult) - 1:
        self.input_blocks.append(torch.nn.ModuleList([block(ch, ch, down=True) if resblock_updown
                                                      else GDDownsample(ch)]))
        chans.append(ch)
        ds *= 2
    self.middle_block = torch.nn.ModuleList([block(ch, ch), GDAttention(ch, head_channels), block(ch, ch)])
    self.output_blocks = torch.nn.ModuleList()
    for level, mult in list(enumerate(channel_mult))[::-1]:
      for i in range(num_res_blocks + 1):
        layers = [block(ch + chans.pop(), channels * mult)]
        ch = channels * mult
        if image_size // ds in attention_resolutions:
          layers.append(GDAttention(ch, head_channels))
        if level and i == num_res_blocks:
          layers.append(block(ch, ch, up=True) if resblock_updown else GDUpsample(ch))
          ds //= 2
        self.output_blocks.append(torch.nn.ModuleList(layers))
    self.out = torch.nn.Sequential(torch.nn.GroupNorm(32, ch), torch.nn.SiLU(), torch.nn.Conv2d(ch, 3, 3, padding=1))

  @staticmethod
  def _run(layers, h, emb):
    for layer in layers:
      h = layer(h, emb) if isinstance(layer, GDResBlock) else layer(h)
    return h

  def forward(self, x, timesteps, y=None):
    half = self.channels // 2
    freqs = torch.exp(-np.log(10000) * torch.arange(half, dtype=x.dtype) / half)
    args = timesteps[:, None] * freqs[None]
    emb = self.time_embed(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))
    if y is not None:
      emb = emb + self.label_emb(y)
    hs, h = [], x
    for layers in self.input_blocks:
      h = self._run(layers, h, emb)
      hs.append(h)
    h = self._run(self.middle_block, h, emb)
    for layers in self.output_blocks:
      h = self._run(layers, torch.cat([h, hs.pop()], dim=1), emb)
    return self.out(h)


CM_CASES = {
    # ImageNet-64's kind: classes, scale-shift norm, resampling residual blocks; 1 head at 32 channels, 2 at 64.
    'imagenet_like': (dict(channels=32, num_res_blocks=1, attention_resolutions=(8,), channel_mult=(1, 2),
                           num_classes=5, head_channels=32, scale_shift=True, resblock_updown=True),
                      dict(name='adm', layout='guided_diffusion', channels=32, channel_mult=(1, 2), num_res_blocks=1,
                           attn_resolutions=(8,), head_dim=32, num_classes=5, adaptive_norm='scale_shift',
                           resblock_updown=True, time_scale=1000.0, dropout=0.0)),
    # LSUN's kind: unconditional, additive norm, conv down / nearest-conv up, three levels.
    'lsun_like': (dict(channels=32, num_res_blocks=1, attention_resolutions=(8, 4), channel_mult=(1, 1, 2),
                       num_classes=0, head_channels=32, scale_shift=False, resblock_updown=False),
                  dict(name='adm', layout='guided_diffusion', channels=32, channel_mult=(1, 1, 2), num_res_blocks=1,
                       attn_resolutions=(8, 4), head_dim=32, num_classes=0, adaptive_norm='shift',
                       resblock_updown=False, time_scale=1000.0, dropout=0.0)),
}


def _gd_network(case, seed=0):
  torch.manual_seed(seed)
  net = GDUNet(RES, **CM_CASES[case][0]).eval()
  with torch.no_grad():
    for name, p in net.named_parameters():
      if p.ndim > 1:
        p.copy_(torch.randn_like(p) / np.sqrt(p[0].numel()))
      elif 'weight' in name:
        p.copy_(1 + 0.1 * torch.randn_like(p))
      else:
        p.copy_(0.1 * torch.randn_like(p))
  return net


def _cm_reference(net, x, sigma, labels, consistency, c_noise_scale=1.0):
  """cm/karras_diffusion.py's denoise: c_skip x + c_out F(c_in x, 1000 * 0.25 ln(sigma + 1e-44), y)."""
  sd, eps = 0.5, 0.002
  s = sigma.reshape(-1, 1, 1, 1)
  if consistency:
    c_skip, c_out = sd**2 / ((s - eps) ** 2 + sd**2), (s - eps) * sd / (s**2 + sd**2).sqrt()
  else:
    c_skip, c_out = sd**2 / (s**2 + sd**2), s * sd / (s**2 + sd**2).sqrt()
  c_in = 1 / (s**2 + sd**2).sqrt()
  return c_skip * x + c_out * net(c_in * x, c_noise_scale * 1000 * 0.25 * torch.log(sigma + 1e-44), labels)


@pytest.mark.parametrize('case', sorted(CM_CASES))
@pytest.mark.parametrize('kind', ['consistency', 'edm'])
def test_cm_release_matches_the_reference(case, kind, tmp_path):
  net = _gd_network(case)
  path = tmp_path / ('edm_net_ema.pt' if kind == 'edm' else 'cd_net.pt')
  torch.save(net.state_dict(), path)
  cm_net = checkpoints.load_cm(path, CM_CASES[case][1], resolution=RES)
  assert cm_net.preconditioning['name'] == kind  # from the file name: edm_* is an EDM teacher
  rng = np.random.default_rng(3)
  x = rng.standard_normal((4, 3, RES, RES)).astype(np.float32)
  labels = np.array([0, 4, 2, 1]) if CM_CASES[case][0]['num_classes'] else None
  reference = _gd_network(case).double()
  with torch.no_grad():
    want = _cm_reference(reference, torch.from_numpy(x).double(), torch.from_numpy(SIGMAS).double(),
                         None if labels is None else torch.from_numpy(labels), kind == 'consistency').numpy()
    float32 = _cm_reference(net, torch.from_numpy(x), torch.from_numpy(SIGMAS),
                            None if labels is None else torch.from_numpy(labels), kind == 'consistency').numpy()
    # c_noise = 250 ln(sigma) reaches 1095 at sigma = 80, where one float32 ulp of it (2^-23 relative) moves the
    # sinusoids by ~1e-4: the reference's change under that perturbation is what float32 cannot resolve.
    ulp = _cm_reference(reference, torch.from_numpy(x).double(), torch.from_numpy(SIGMAS).double(),
                        None if labels is None else torch.from_numpy(labels), kind == 'consistency',
                        1 + 2.0**-23).numpy()
  fn = cm_net.consistency if kind == 'consistency' else cm_net.denoise
  got = np.asarray(fn(x.transpose(0, 2, 3, 1), SIGMAS, labels)).transpose(0, 3, 1, 2)
  for i, sigma in enumerate(SIGMAS):
    error = _relative_error(got[i], want[i])
    tolerance = _tolerance(max(_relative_error(float32[i], want[i]), _relative_error(ulp[i], want[i])))
    assert error < tolerance, (case, kind, sigma, error, tolerance)
  if kind == 'consistency':  # the boundary: f(x, sigma_min) = x
    np.testing.assert_allclose(fn(x.transpose(0, 2, 3, 1), np.full(4, 0.002, np.float32), labels),
                               x.transpose(0, 2, 3, 1), atol=1e-6)


def test_cm_state_dict_of_another_architecture_is_named(tmp_path):
  path = tmp_path / 'cd_net.pt'
  torch.save(_gd_network('lsun_like').state_dict(), path)
  wider = dict(CM_CASES['lsun_like'][1], channels=64)
  with pytest.raises(ValueError, match=r'tensor input_blocks\.0\.0\.bias has shape \(32,\) .* needs \(64,\)'):
    checkpoints.load_cm(path, wider, resolution=RES)
  with pytest.raises(ValueError, match=r'lacks the tensor label_emb\.weight'):
    checkpoints.load_cm(path, dict(CM_CASES['lsun_like'][1], num_classes=5), resolution=RES)
  torch.save(_gd_network('imagenet_like').state_dict(), path)  # another network: its first mis-shaped tensor
  with pytest.raises(ValueError, match=r'input_blocks\.1\.0\.emb_layers\.1\.bias has shape \(64,\) .* needs \(32,\)'):
    checkpoints.load_cm(path, CM_CASES['lsun_like'][1], resolution=RES)
  torch.save(dict(_gd_network('lsun_like').state_dict(), **{'extra.weight': torch.zeros(3)}), path)
  with pytest.raises(ValueError, match=r'tensor extra\.weight \(3,\) has no place in'):  # all fit, one more
    checkpoints.load_cm(path, CM_CASES['lsun_like'][1], resolution=RES)
  with pytest.raises(FileNotFoundError):
    checkpoints.load_cm(tmp_path / 'missing.pt')


if __name__ == '__main__':
  _write_fixture()
