"""What a run prints, and where everything else goes.

The console (stdout, process 0) shows the run: a line naming the experiment, progress lines with rate, ETA and the
latest metric averages (at most about ten per run), checkpoint and sample events folded into the progress line of
their step, and the final table. Library logs (absl, Orbax, TFDS, JAX, Python warnings), the parameter overview and
tracebacks go to WORKDIR/logs/process_<i>.log, one file per process, appended across restarts (what is logged
before the processes have joined is held in memory, then written there). `--verbosity`
(absl's flag) or `--alsologtostderr` also sends the log to stderr, at that verbosity.
"""

import io
import logging as python_logging
import math
import time

from absl import flags
from absl import logging
import jax
from etils import epath

LOG_DIR = 'logs'


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

