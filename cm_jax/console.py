"""What a run prints, and where everything else goes.

The console (stdout, process 0) shows the run: a line naming the experiment, progress lines with rate, ETA and the
latest metric averages (at most about ten per run), checkpoint and sample events folded into the progress line of
their step, and the final table. Library logs (absl, Orbax, TFDS, JAX, Python warnings), the parameter overview and
tracebacks go to WORKDIR/logs/process_<i>.log, one file per process, appended across restarts (what is logged
before the processes have joined is held in memory, then written there). `--verbosity`
(absl's flag) or `--alsologtostderr` also sends the log to stderr, at that verbosity.

With libtpu installed on a host without TPUs (the pre-flight's `.[tpu]` extra on a workstation), JAX would ask libtpu
for TPUs at start and libtpu prints its initialisation warnings on stderr; `select_platforms` starts JAX on the host's
other platforms instead (the pre-flight still compiles for TPUs: jax.experimental.topologies loads libtpu itself).
"""

import glob as glob_lib
import importlib.metadata
import importlib.util
import io
import logging as python_logging
import math
import os
import pkgutil
import time

from absl import flags
from absl import logging
import jax
from etils import epath

LOG_DIR = 'logs'


TPU_DEVICE_FILES = ('/dev/accel*', '/dev/vfio')  # what a TPU VM has (v2-v4: /dev/accel<i>; v5e and later: vfio)
GPU_DEVICE_FILES = {'cuda': '/dev/nvidia[0-9]*', 'rocm': '/dev/kfd'}  # a GPU JAX's plugin for it can start


def host_platforms(environ, glob=glob_lib.glob, find_spec=importlib.util.find_spec, plugins=None):
  """The JAX platforms to start on this host, or None for JAX's own choice: the user's JAX_PLATFORMS, a TPU device
  file, or no libtpu installed leave it to JAX; else the GPU platforms ('cuda', 'rocm') with JAX's plugin installed
  and a device file, then 'cpu' (e.g. 'cuda,cpu'). `plugins`: the names of JAX's plugin modules (default: those
  installed)."""
  if 'JAX_PLATFORMS' in environ or any(glob(pattern) for pattern in TPU_DEVICE_FILES):
    return None
  if find_spec('libtpu') is None:
    return None
  plugins = _jax_plugins() if plugins is None else plugins
  gpus = [p for p, files in GPU_DEVICE_FILES.items() if any(p in name for name in plugins) and glob(files)]
  return ','.join(gpus + ['cpu'])


def _jax_plugins() -> list[str]:
  """The plugin modules JAX loads at start: the jax_plugins namespace package's modules and the entry points."""
  names = [e.value for e in importlib.metadata.entry_points(group='jax_plugins')]
  if importlib.util.find_spec('jax_plugins') is not None:
    import jax_plugins  # pylint: disable=g-import-not-at-top
    names += [m.name for m in pkgutil.iter_modules(jax_plugins.__path__)]
  return names


def select_platforms() -> None:
  """Starts JAX on `host_platforms` (before any JAX computation), where they differ from JAX's own choice."""
  platforms = host_platforms(os.environ)
  if platforms is not None:
    jax.config.update('jax_platforms', platforms)


def hold_logs() -> None:
  """Keeps the log in memory until `route_logs` knows this process's file (JAX logs while processes join)."""
  logging.get_absl_handler().python_handler.stream = io.StringIO()
  flags.FLAGS.logtostderr = False


def route_logs(workdir) -> epath.Path:
  """Sends absl / Python logging and warnings of this process to WORKDIR/logs/process_<i>.log; returns its path.

  Console output of the libraries is muted: TFDS progress bars are off, warnings are logged. With --verbosity or
  --alsologtostderr given, the log is also written to stderr.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  path = epath.Path(workdir) / LOG_DIR / f'process_{jax.process_index()}.log'
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    stream = path.open('a')
  except OSError as e:
    raise ValueError(f'cannot write the workdir {workdir} ({e.strerror or e}): choose a --workdir that is a '
                     'writable directory (or a new one).') from e
  handler = logging.get_absl_handler().python_handler
  if isinstance(handler.stream, io.StringIO):
    stream.write(handler.stream.getvalue())
  handler.stream = stream
  flags.FLAGS.logtostderr = False
  if flags.FLAGS['verbosity'].present:
    flags.FLAGS.alsologtostderr = True
  python_logging.captureWarnings(True)
  tfds.disable_progress_bar()
  return path


def say(text: str) -> None:
  """One console line from process 0 (also logged)."""
  logging.info('%s', text)
  if jax.process_index() == 0:
    print(text, flush=True)


def console_every(num_steps: int, log_every: int, lines: int = 10) -> int:
  """The console's progress cadence: a multiple of train.log_every giving at most about `lines` lines."""
  return log_every * max(1, math.ceil(num_steps / (lines * log_every)))


def format_seconds(seconds: float) -> str:
  seconds = int(seconds)
  return f'{seconds // 3600}h{seconds % 3600 // 60:02d}m{seconds % 60:02d}s'


class Progress:
  """Steps/s and ETA every `every` steps (and at the last), with the latest metric averages and the step's events.

  `note(step, event)` attaches an event ('checkpoint', 'samples') to the line of its step, or prints it alone when
  the step has no progress line; `end_step(step, metrics)` prints the line and returns the rate (steps/s) when the
  step is one of the console's, else None.
  """

  def __init__(self, total_steps: int, every: int, start_step: int = 0):
    self.total_steps, self.every = total_steps, every
    self._last_step, self._last_time = start_step, time.monotonic()
    self._events = []

  def note(self, event: str) -> None:
    self._events.append(event)

  def end_step(self, step: int, metrics: dict):
    events, self._events = self._events, []
    if step % self.every and step != self.total_steps:
      if events:
        say(f'step {step}/{self.total_steps}  ' + ', '.join(events))
      return None
    now = time.monotonic()
    rate = (step - self._last_step) / max(now - self._last_time, 1e-9)
    eta = (self.total_steps - step) / max(rate, 1e-9)
    self._last_step, self._last_time = step, now
    shown = '  '.join(f'{k} {float(v):.4g}' for k, v in sorted(metrics.items()) if k != 'nonfinite' or v)
    say(f'step {step}/{self.total_steps}  {rate:.2f} steps/s  ETA {format_seconds(eta)}  {shown}'
        + ''.join(f'  [{e}]' for e in events))
    return rate

