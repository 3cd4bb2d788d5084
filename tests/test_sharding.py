"""The mesh from config, partition rules, and fully sharded (FSDP) training matching replicated training."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from cm_jax import experiment
from cm_jax import models
from cm_jax import sharding
from configs import base
from helpers import tiny_config
from helpers import losses

# The tiny MLP's kernels are [32, 32] except dense_in [2, 32]: its output axis is split instead.
FSDP_RULES = ((r'dense_in/kernel$', (None, 'fsdp')), (r'kernel$', ('fsdp', None)), (r'bias$|scale$', ('fsdp',)))


def _mesh_config(**shape):
  return ml_collections.ConfigDict(dict(shape=shape, rules=(), min_size=0))


def test_mesh_fills_the_minus_one_axis():
  mesh = sharding.make_mesh(_mesh_config(data=-1, fsdp=4), jax.devices()[:8])
  assert dict(mesh.shape) == {'data': 2, 'fsdp': 4}
  assert dict(sharding.make_mesh(_mesh_config(data=2, fsdp=-1), jax.devices()[:8]).shape) == {'data': 2, 'fsdp': 4}
  for bad in (dict(data=-1, fsdp=-1), dict(data=3, fsdp=-1), dict(data=2, fsdp=2)):
    with pytest.raises(ValueError, match='mesh.shape'):
      sharding.make_mesh(_mesh_config(**bad), jax.devices()[:8])


def test_rules_align_with_trailing_dimensions_and_respect_min_size():
  sizes = {'data': 2, 'fsdp': 4}
  rules = ((r'^params/.*kernel$', ('fsdp', None)), (r'kernel$', (('data', 'fsdp'),)))
  spec = lambda path, shape, min_size=0: sharding.partition_spec(path, shape, rules, min_size, sizes)
  assert spec('params/conv/kernel', (3, 3, 64, 128)) == P(None, None, 'fsdp', None)
  assert spec('params/dense/kernel', (64, 128)) == P('fsdp', None)
  assert spec('opt_state/mu/params/dense/kernel', (64, 128)) == P(None, ('data', 'fsdp'))  # first match wins
  assert spec('params/dense/kernel', (64, 128), min_size=64 * 128 + 1) == P()  # too small: replicated
  assert spec('params/dense/bias', (128,)) == P()  # no rule: replicated


@pytest.mark.parametrize('rule, message', [
    ((r'kernel$', ('fsdp', None)), 'do not divide its dimension of size 6'),
    ((r'kernel$', ('fsdp', None, None)), 'more entries than the leaf has dimensions'),
    ((r'kernel$', ('model', None)), "no mesh axis 'model'"),
])
def test_bad_rules_fail_naming_the_leaf(rule, message):
  with pytest.raises(ValueError, match=message) as error:
    sharding.partition_spec('params/dense/kernel', (6, 8), (rule,), 0, {'data': 2, 'fsdp': 4})
  assert 'params/dense/kernel' in str(error.value)


def test_default_rules_shard_every_large_kernel_of_a_cifar10_unet():
  """The base config's example rules with fsdp=8: each kernel of >= min_size elements is split, nothing else."""
  rules, min_size = base.get_config().mesh.rules, base.get_config().mesh.min_size
  network = models.build_model(dict(name='unet', channels=128, channel_mult=(1, 2, 2, 2), num_res_blocks=4,
                                    attn_resolutions=(16,)))
  params = jax.eval_shape(lambda: network.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), jnp.zeros((1,))))
  mesh = sharding.make_mesh(_mesh_config(data=1, fsdp=8), jax.devices()[:8])
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  shardings = jax.tree.leaves(sharding.tree_shardings(params, mesh, rules, min_size))
  split = [sharding.tree_path(path) for (path, leaf), s in zip(leaves, shardings) if s.shard_shape(leaf.shape) != leaf.shape]
  large_kernels = [sharding.tree_path(path) for path, leaf in leaves
                   if sharding.tree_path(path).endswith('kernel') and leaf.size >= min_size]
  assert split == large_kernels and len(split) > 100


def _fsdp_config(num_steps):
  config = tiny_config(num_steps=num_steps, batch_size=16)
  config.mesh.shape = dict(data=2, fsdp=4)
  config.mesh.rules = FSDP_RULES
  config.mesh.min_size = 32
  return config


def test_fsdp_state_is_born_sharded_and_trains_like_replicated():
  """Parameters, EMAs, target and Adam moments split 4 ways over fsdp; losses equal replicated training."""
  steps = 6
  config = _fsdp_config(steps)
  exp = experiment.Experiment(config, jax.devices()[:8])
  state = exp.init_state()
  for leaf, expected in zip(jax.tree.leaves(state), jax.tree.leaves(exp.state_sharding), strict=True):
    assert leaf.sharding.is_equivalent_to(expected, leaf.ndim)
  kernel = lambda tree: tree['block_0']['dense_0']['kernel']
  adam = state.opt_state[1][0]
  for leaf in (kernel(state.params), kernel(state.ema[0]), kernel(state.ema[1]),
               kernel(adam.mu['params']), kernel(adam.nu['params'])):
    assert leaf.addressable_shards[0].data.shape == (8, 32)  # [32, 32] split 4 ways on its first axis
  # iCT keeps no target copy; one that does (CD, CT) has its target sharded like the parameters.
  with_target = exp.abstract_state.replace(target=exp.abstract_state.params)
  target_sharding = sharding.tree_shardings(with_target, exp.mesh, config.mesh.rules, config.mesh.min_size)
  assert target_sharding.target == target_sharding.params
  assert state.params['dense_in']['kernel'].addressable_shards[0].data.shape == (2, 8)
  assert state.params['dense_out']['bias'].addressable_shards[0].data.shape == (2,)  # under min_size

  fsdp_losses, fsdp_state = losses(config, jax.devices()[:8], steps)
  replicated_losses, replicated_state = losses(tiny_config(num_steps=steps, batch_size=16), jax.devices()[:8], steps)
  np.testing.assert_allclose(fsdp_losses, replicated_losses, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(fsdp_state.params), jax.tree.leaves(replicated_state.params), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
  assert kernel(fsdp_state.params).sharding.spec == P('fsdp', None)
