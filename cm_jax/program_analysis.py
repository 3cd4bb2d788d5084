"""What a compiled XLA program tells about one chip: bytes (memory analysis), FLOPs, bytes accessed and XLA's time
estimate (cost analysis), and from its HLO text the collectives and the largest values.

Used by the pre-flight (cm_jax/preflight.py) on programs compiled for a TPU topology or for host CPU devices.
"""

import dataclasses
import math
import re
from typing import Optional


@dataclasses.dataclass(frozen=True)
class Chip:
  """One accelerator chip: HBM capacity, peak dense bf16 FLOP/s and HBM bandwidth (both per chip)."""
  name: str
  hbm_gib: float
  peak_tflops: float
  hbm_gbps: float


COLLECTIVES = ('all-gather', 'reduce-scatter', 'all-reduce', 'all-to-all', 'collective-permute')
_DTYPE_BYTES = {'pred': 1, 's8': 1, 'u8': 1, 's16': 2, 'u16': 2, 'f16': 2, 'bf16': 2, 's32': 4, 'u32': 4, 'f32': 4,
                's64': 8, 'u64': 8, 'f64': 8, 'c64': 8, 'c128': 16, 'f8e4m3fn': 1, 'f8e5m2': 1}
_ARRAY = re.compile(r'\b([a-z][a-z0-9]*)\[([0-9,]*)\]')
# An instruction: '%name = <shape> <opcode>(...'; async pairs are counted at their '-done' (whose shape is the result).
_INSTRUCTION = re.compile(r'^\s*(?:ROOT\s+)?%?(?P<name>[\w.\-]+)\s*=\s*(?P<shape>.*?)\s(?P<op>[a-z][a-z0-9\-]*)\(',
                          re.M)
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_NOT_BUFFERS = ('parameter', 'get-tuple-element', 'bitcast')


def shape_bytes(shape: str) -> int:
  """Bytes of an HLO shape string: an array 'f32[8,128]{1,0}' or a tuple of them."""
  return sum(_DTYPE_BYTES.get(dtype, 0) * math.prod(int(d) for d in dims.split(',') if d)
             for dtype, dims in _ARRAY.findall(shape))


def collectives(hlo_text: str) -> dict:
  """{kind: [count, bytes]} of the collectives in an HLO module's text, for each kind in COLLECTIVES.

  Each instruction is counted once where it appears (one inside a loop body runs once per iteration); bytes are its
  result's per device. An async pair ('-start' / '-done') is counted at its '-done'.
  """
  found = {kind: [0, 0] for kind in COLLECTIVES}
  for m in _INSTRUCTION.finditer(hlo_text):
    kind = m.group('op').removesuffix('-done')
    if kind in found:
      found[kind][0] += 1
      found[kind][1] += shape_bytes(m.group('shape'))
  return found


def largest_values(hlo_text: str, count: int = 8) -> list:
  """The `count` largest arrays an HLO module's unfused computations make: [bytes, 'name shape op (source op)'].

  Inputs (parameters), views (get-tuple-element, bitcast), tuples and the insides of fusions are left out.
  """
  values, fused = [], False
  for line in hlo_text.splitlines():
    if line.endswith('{') and '=' not in line.split('(')[0]:  # a computation's header
      fused = 'fused' in line.split('(')[0]
      continue
    m = _INSTRUCTION.match(line)
    if fused or not m or m.group('shape').startswith('(') or m.group('op') in _NOT_BUFFERS:
      continue
    source = _OP_NAME.search(line)
    values.append([shape_bytes(m.group('shape')), f'{m.group("name")} {m.group("shape")} {m.group("op")}'
                   + (f' ({source.group(1)})' if source else '')])
  return sorted(values, key=lambda v: -v[0])[:count]


@dataclasses.dataclass
class Analysis:
  """A compiled program's per-chip bytes (XLA memory analysis), FLOPs, bytes accessed and time estimate (cost
  analysis; optimal_seconds is None where XLA gives none), collectives and largest values (HLO text)."""
  argument_bytes: int
  output_bytes: int
  temp_bytes: int
  alias_bytes: int
  code_bytes: int
  flops: float
  bytes_accessed: float
  optimal_seconds: Optional[float]
  collectives: dict
  largest: list
  compile_s: float
  cache: str = 'off'  # JAX's persistent cache: 'off', 'miss' or 'hit'; 'record': read from the pre-flight's record

  @property
  def hbm_bytes(self) -> int:
    """Per-chip bytes while it runs: arguments + outputs + temporaries - donated (aliased) + the program."""
    return self.argument_bytes + self.output_bytes + self.temp_bytes - self.alias_bytes + self.code_bytes

  @property
  def estimated(self) -> bool:
    """Whether XLA gave a usable time estimate (libtpu 0.0.42.1 gives v4 programs negative ones)."""
    return self.optimal_seconds is not None and self.optimal_seconds > 0

  def step_seconds(self, chip: Chip) -> float:
    """XLA's estimate, else the roofline max(FLOPs / peak, bytes accessed / bandwidth)."""
    if self.estimated:
      return self.optimal_seconds
    return max(self.flops / (chip.peak_tflops * 1e12), self.bytes_accessed / (chip.hbm_gbps * 1e9))


def analyse(compiled, compile_s: float) -> Analysis:
  """The Analysis of a jax Compiled object."""
  memory, cost, text = compiled.memory_analysis(), compiled.cost_analysis(), compiled.as_text()
  return Analysis(memory.argument_size_in_bytes, memory.output_size_in_bytes, memory.temp_size_in_bytes,
                  memory.alias_size_in_bytes, memory.generated_code_size_in_bytes, float(cost.get('flops', 0.0)),
                  float(cost.get('bytes accessed', 0.0)), cost.get('optimal_seconds'), collectives(text),
                  largest_values(text), compile_s)
