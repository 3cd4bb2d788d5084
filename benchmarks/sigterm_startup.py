"""SIGTERM at random moments of a run's start-up: how often the process exits 0 with its one line.

  python benchmarks/sigterm_startup.py [--trials=10] [--load=2] [--max_delay=1.5]

Each trial starts `python -m cm_jax.main` on the 2-D toy (configs/toy2d_ict.py:gmm, a million steps), waits for its
log file (the SIGTERM handler is in place by then), sleeps a uniform random delay and sends SIGTERM, which lands in
start-up, compilation or the first steps. `--load` CPU-bound processes run beside it, as on a busy machine. Prints
each trial's exit status and last console line, then `exits: 0=<n> other=<m>`.
"""

import multiprocessing
import os
import pathlib
import random
import signal
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags

_TRIALS = flags.DEFINE_integer('trials', 10, 'Runs to interrupt.')
_LOAD = flags.DEFINE_integer('load', 2, 'CPU-bound processes beside each run.')
_MAX_DELAY = flags.DEFINE_float('max_delay', 1.5, 'Largest delay (s) between the log file and the SIGTERM.')
ROOT = pathlib.Path(__file__).resolve().parents[1]


def _burn(seconds: float):
  end = time.time() + seconds
  while time.time() < end:
    sum(i * i for i in range(10_000))


def trial(workdir: pathlib.Path, delay: float):
  workdir.mkdir(parents=True)
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  with open(workdir / 'console.log', 'w') as log:
    process = subprocess.Popen(
        [sys.executable, '-m', 'cm_jax.main', '--config=configs/toy2d_ict.py:gmm', f'--workdir={workdir / "run"}',
         '--config.train.num_steps=1000000'], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
  while not (workdir / 'run' / 'logs' / 'process_0.log').exists():
    if process.poll() is not None:
      break
    time.sleep(0.01)
  time.sleep(delay)
  process.send_signal(signal.SIGTERM)
  try:
    code = process.wait(timeout=60)
  except subprocess.TimeoutExpired:
    process.kill()
    code = 'hung'
  lines = (workdir / 'console.log').read_text().splitlines()
  return code, lines[-1] if lines else ''


def main(argv):
  del argv
  rng = random.Random(0)
  burners = [multiprocessing.Process(target=_burn, args=(3600,), daemon=True) for _ in range(_LOAD.value)]
  for b in burners:
    b.start()
  codes = []
  try:
    with tempfile.TemporaryDirectory() as root:
      for i in range(_TRIALS.value):
        code, last = trial(pathlib.Path(root) / str(i), rng.uniform(0.0, _MAX_DELAY.value))
        codes.append(code)
        print(f'trial {i}: exit {code}: {last[:120]}', flush=True)
  finally:
    for b in burners:
      b.terminate()
  print(f'exits: 0={codes.count(0)} other={len(codes) - codes.count(0)}')


if __name__ == '__main__':
  app.run(main)
