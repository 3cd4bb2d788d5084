"""The pre-flight (cm_jax/preflight.py): its HLO parsing, its numbers on host CPU devices (--topology=cpu:N) against
hand counts, its command line, and a TPU topology where libtpu is installed (skipped where it is not)."""

import dataclasses
import importlib.util
import os
import re
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

from cm_jax import preflight
from cm_jax import program_analysis
from configs import toy2d_edm

HAS_LIBTPU = importlib.util.find_spec('libtpu') is not None
MACHINE_LINE = re.compile(r'preflight: fits=(yes|no) hbm_gib=(\d+\.\d\d) hbm_capacity_gib=(\d+\.\d) '
                          r'step_s=(\d+\.\d{4}) mfu=(\d+\.\d\d)')

HLO = """HloModule m

%fused_computation.1 (p: f32[1024,1024]) -> f32[1024,1024] {
  %p = f32[1024,1024]{1,0} parameter(0)
  ROOT %inside = f32[1024,1024]{1,0} multiply(%p, %p)
}

ENTRY %main (a: f32[8,128]) -> (f32[16,128]) {
  %a = f32[8,1024,1024]{2,1,0} parameter(0)
  %all-gather.1 = f32[16,128]{1,0:T(8,128)} all-gather(%a), channel_id=1, replica_groups={{0,1}}, dimensions={0}
  %ags = (bf16[8,128]{1,0}, bf16[16,128]{1,0}) all-gather-start(%b), channel_id=2
  %agd = bf16[16,128]{1,0} all-gather-done(%ags)
  %ar = (f32[4]{0}, s32[2]{0}) all-reduce(%x, %y), to_apply=%add
  %rs = f32[4,128]{1,0} reduce-scatter(%c), dimensions={0}, metadata={op_name="jit(f)/psum_scatter"}
  %cps = (f32[2,2]{1,0}, f32[2,2]{1,0}, u32[], u32[]) collective-permute-start(%d), source_target_pairs={{0,1}}
  %cpd = f32[2,2]{1,0} collective-permute-done(%cps)
  %fusion = f32[1024,1024]{1,0} fusion(%q), kind=kLoop, calls=%fused_computation.1, metadata={op_name="jit(f)/big"}
  %gte = f32[8,1024,1024]{2,1,0} get-tuple-element(%w), index=0
  ROOT %t = (f32[16,128]{1,0}, f32[1024,1024]{1,0}) tuple(%all-gather.1, %fusion)
}
"""


def test_collectives_count_each_instruction_with_its_result_bytes():
  assert program_analysis.collectives(HLO) == {
      'all-gather': [2, 16 * 128 * 4 + 16 * 128 * 2],  # the sync one, and the async pair at its '-done'
      'reduce-scatter': [1, 4 * 128 * 4],
      'all-reduce': [1, 4 * 4 + 2 * 4],  # a tuple result: both arrays
      'all-to-all': [0, 0],
      'collective-permute': [1, 2 * 2 * 4]}


def test_largest_values_skip_inputs_views_tuples_and_fusion_insides():
  largest = program_analysis.largest_values(HLO, count=2)
  assert [b for b, _ in largest] == [1024 * 1024 * 4, 16 * 128 * 4]
  assert largest[0][1].startswith('fusion f32[1024,1024]') and largest[0][1].endswith('(jit(f)/big)')


def _mlp_config(data: int, fsdp: int):
  """EDM (one forward and backward per step) on a 2-D toy with a 512-wide MLP, every kernel sharded over fsdp."""
  c = toy2d_edm.get_config()
  c.model.hidden, c.model.depth = 512, 2
  c.train.batch_size = 256
  c.mesh.shape = dict(data=data, fsdp=fsdp)
  c.mesh.min_size = 0
  c.sampling.teacher_steps = 2  # the sampler's compile: 2 Heun steps
  return c


@pytest.fixture(scope='module')
def reports():
  """Pre-flights of the same step on one device, on two data-parallel devices and on two FSDP devices."""
  return {(data, fsdp): preflight.run(_mlp_config(data, fsdp), f'cpu:{data * fsdp}')
          for data, fsdp in ((1, 1), (2, 1), (1, 2))}


def _kernels(exp):
  """{path: (fan_in, fan_out)} of the network's dense kernels."""
  flat = jax.tree_util.tree_flatten_with_path(exp.abstract_state.params)[0]
  return {jax.tree_util.keystr(path): leaf.shape for path, leaf in flat if 'kernel' in jax.tree_util.keystr(path)}


def test_train_step_flops_match_a_hand_count_of_its_matmuls(reports):
  report = reports[(2, 1)]
  kernels = _kernels(report.exp)
  per_chip = 256 // 2
  forward = sum(2 * per_chip * i * o for i, o in kernels.values())
  # No input gradient where the input is not differentiated: the data (dense_in) and the noise sinusoids (dense_0 of
  # the time embedding).
  no_input_grad = sum(2 * per_chip * i * o for k, (i, o) in kernels.items()
                      if 'dense_in' in k or ('time_embed' in k and 'dense_0' in k))
  matmuls = 3 * forward - no_input_grad  # forward, weight gradients, input gradients
  # The rest (norms, activations, Adam and the EMA: tens of FLOPs per activation or parameter) adds a few percent.
  assert 1.0 <= report.step.flops / matmuls <= 1.15, (report.step.flops, matmuls)
  # FLOPs are per chip: one chip does the whole batch, twice the work of each of two.
  assert reports[(1, 1)].step.flops / report.step.flops == pytest.approx(2.0, rel=0.05)


def test_argument_bytes_are_the_state_and_batch_shards(reports):
  report = reports[(1, 2)]
  exp = report.exp
  expected = 0
  for path, leaf in jax.tree_util.tree_flatten_with_path(exp.abstract_state)[0]:
    size = int(np.prod(leaf.shape)) * leaf.dtype.itemsize
    expected += size // 2 if jax.tree_util.keystr(path).endswith("['kernel']") else size  # rule kernel$ -> fsdp
  assert report.state_bytes == expected
  # A batch shard: float32 points [128, 2]; jit drops the labels, which the unconditional network does not read.
  assert report.step.argument_bytes == expected + (256 // 2) * 2 * 4
  # The state is donated: its buffers are the outputs' (aliased), counted once while the step runs.
  assert report.step.alias_bytes == expected
  assert report.step.hbm_bytes == (report.step.argument_bytes + report.step.output_bytes + report.step.temp_bytes
                                   + report.step.code_bytes - expected)


def test_collectives_of_one_two_data_parallel_and_two_fsdp_devices(reports):
  assert all(n == 0 for n, _ in reports[(1, 1)].step.collectives.values())
  param_bytes = sum(int(np.prod(p.shape)) * 4 for p in jax.tree.leaves(reports[(2, 1)].exp.abstract_state.params))
  gradients = reports[(2, 1)].step.collectives['all-reduce'][1]
  assert param_bytes <= gradients <= param_bytes + 2**16  # every gradient is summed over the replicas (+ scalars)
  assert reports[(2, 1)].step.collectives['all-gather'][0] == 0
  kernel_bytes = sum(i * o * 4 for i, o in _kernels(reports[(1, 2)].exp).values())
  assert reports[(1, 2)].step.collectives['all-gather'][1] >= kernel_bytes  # each sharded kernel gathered for use


def test_report_lines_and_a_capacity_that_does_not_fit(reports):
  report = reports[(2, 1)]
  lines = preflight.describe(report)
  fits = MACHINE_LINE.fullmatch(lines[-1])
  assert fits and fits.group(1) == 'yes' and fits.group(3) == f'{preflight.NOMINAL_CPU.hbm_gib:.1f}'
  assert float(fits.group(2)) == pytest.approx(report.hbm_bytes / 2**30, abs=0.005)
  step_s = max(report.step.flops / 0.1e12, report.step.bytes_accessed / 20e9)  # the nominal chip's roofline
  assert float(fits.group(4)) == pytest.approx(step_s, abs=5e-5)
  assert float(fits.group(5)) == pytest.approx(report.step.flops / (step_s * 0.1e12), abs=0.005)
  intensity = report.step.flops / report.step.bytes_accessed  # against the nominal chip's 0.1e12 / 20e9 = 5
  assert any(f'{intensity:.0f} FLOP per byte (the chip\'s ridge: 5)' in line for line in lines)
  report.capacity_gib = report.step.hbm_bytes / 2**30 / 2
  assert not report.fits
  assert MACHINE_LINE.fullmatch(preflight.describe(report)[-1]).group(1) == 'no'
  assert any(line.startswith('largest values of the train step') for line in preflight.describe(report))


def test_the_abstract_batch_holds_records_as_their_sources_return_them():
  """Image sets hand stored uint8 pixels to the step (a quarter of float32's bytes), toy points and digits floats."""
  data = lambda name, size=0: ml_collections.ConfigDict(dict(name=name, image_size=size))
  assert preflight.data_record(data('cifar10')) == ((32, 32, 3), np.uint8)
  assert preflight.data_record(data('image_folder', 64)) == ((64, 64, 3), np.uint8)
  assert preflight.data_record(data('digits')) == ((8, 8, 1), np.float32)
  assert preflight.data_record(data('gmm')) == ((2,), np.float32)


def test_an_unusable_xla_estimate_falls_back_to_the_roofline():
  """libtpu 0.0.42.1 estimates a v4 program at -455.9 s: the step time is then max(FLOPs / peak, bytes / bandwidth)."""
  v4 = preflight.CHIPS['v4']
  analysis = program_analysis.Analysis(0, 0, 0, 0, 0, flops=10.47e12, bytes_accessed=72.39e9, optimal_seconds=-455.9,
                                       collectives={}, largest=[], compile_s=1.0)
  assert not analysis.estimated
  assert analysis.step_seconds(v4) == pytest.approx(72.39e9 / 1200e9)  # bandwidth-bound: 60.3 ms > 38.1 ms of FLOPs
  assert dataclasses.replace(analysis, bytes_accessed=1e9).step_seconds(v4) == pytest.approx(10.47e12 / 275e12)
  assert dataclasses.replace(analysis, optimal_seconds=0.1446).step_seconds(v4) == 0.1446


@pytest.mark.parametrize('name', ['v9:2x2', 'v5p', 'tpu:4', 'cpu:0', 'cpu:99'])
def test_unknown_topologies_are_refused(name):
  with pytest.raises(ValueError, match=re.escape(name) if name.startswith('cpu') else 'unknown topology'):
    preflight.topology(name)


@pytest.mark.skipif(HAS_LIBTPU, reason='libtpu is installed')
def test_a_tpu_topology_without_libtpu_names_the_extra():
  with pytest.raises(ImportError, match=re.escape("pip install -e '.[tpu]'")):
    preflight.topology('v5p:2x2x1')


def _cli(*args):
  return subprocess.run([sys.executable, '-m', 'cm_jax.preflight', *args], capture_output=True, text=True,
                        timeout=300, env=dict(os.environ, PYTHONPATH=os.getcwd()), check=False)


def test_cli_unknown_topology_ends_with_one_line():
  result = _cli('--config=configs/toy2d_edm.py', '--topology=v9:2x2')
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1].startswith('cm_jax: error: unknown topology \'v9:2x2\'')


@pytest.mark.slow
def test_cli_reuses_its_cache_and_refuses_what_does_not_fit(tmp_path):
  args = ('--config=configs/toy2d_edm.py', '--topology=cpu:1', f'--cache_dir={tmp_path}',
          '--config.sampling.teacher_steps=2')
  first = _cli(*args)
  assert first.returncode == 0, first.stderr
  assert MACHINE_LINE.fullmatch(first.stdout.strip().splitlines()[-1]).group(1) == 'yes'
  assert 'train step: compiled in' in first.stdout and '(JAX cache: miss)' in first.stdout
  assert any(line.startswith('sampler with decoding (2 step(s)') for line in first.stdout.splitlines())
  second = _cli(*args, '--hbm_gib=0.001', '--nosampler')
  assert second.returncode == 1
  assert 'JAX cache: hit' in second.stdout and 'sampler' not in second.stdout
  last = MACHINE_LINE.fullmatch(second.stdout.strip().splitlines()[-1])
  assert last and last.group(1) == 'no' and last.group(3) == '0.0'
  assert second.stderr.strip().splitlines()[-1].startswith('cm_jax: error: configs/toy2d_edm.py does not fit on cpu:1')


@pytest.mark.skipif(not HAS_LIBTPU, reason='libtpu is not installed (pip install -e \'.[tpu]\')')
def test_digits_on_a_v5p_slice():
  from configs import digits_ict  # pylint: disable=g-import-not-at-top
  report = preflight.run(digits_ict.get_config(), 'v5p:2x2x1')
  assert len(report.exp.mesh.devices.flatten()) == 4 and report.topo.num_hosts == 1
  assert report.fits and report.step.optimal_seconds > 0 and report.step.flops > 0
  inputs = report.state_bytes + 128 // 4 * 8 * 8 * 1 * 4  # the state and an image shard (labels unread)
  assert inputs <= report.step.argument_bytes <= 1.01 * inputs  # TPU layouts pad small arrays to their tiles
  assert MACHINE_LINE.fullmatch(preflight.describe(report)[-1]).group(1) == 'yes'
