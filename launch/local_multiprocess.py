"""N CPU processes of `python -m cm_jax.main` on 127.0.0.1: the multi-host code paths on one machine.

  python launch/local_multiprocess.py --num_processes=2 --devices_per_process=4 -- \
      --config=configs/toy2d_ict.py:gmm --workdir=/tmp/toy2d_2x4 --config.train.num_steps=200

Every process gets CM_JAX_COORDINATOR=127.0.0.1:<free port>, CM_JAX_NUM_PROCESSES, CM_JAX_PROCESS_ID,
JAX_PLATFORMS=cpu and `devices_per_process` simulated CPU devices (other XLA_FLAGS pass through). The output
of process i goes to `log_dir/process_<i>.log`, or to this terminal when --log_dir is unset. When one process
fails, or the time limit passes, the others are killed. SIGTERM or Ctrl-C to the launcher sends SIGTERM to every process: a
preemption, so they save a checkpoint at a common step and exit 0; the same command resumes the run.
For testing only: nothing leaves 127.0.0.1.
"""

import argparse
import os
import pathlib
import signal
import subprocess
import sys
import time

import portpicker

ROOT = pathlib.Path(__file__).resolve().parents[1]


def xla_flags(devices: int, flags: str = '') -> str:
  """`flags` (e.g. the caller's XLA_FLAGS) with the number of simulated CPU devices set to `devices`."""
  kept = [f for f in flags.split() if not f.startswith('--xla_force_host_platform_device_count=')]
  return ' '.join(kept + [f'--xla_force_host_platform_device_count={devices}'])


def start(main_args, num_processes: int, devices_per_process: int, log_dir=None):
  """Starts the processes of one run (Popen objects, process i at index i), each in its own session."""
  port = portpicker.pick_unused_port()
  base = dict(os.environ, JAX_PLATFORMS='cpu',
              XLA_FLAGS=xla_flags(devices_per_process, os.environ.get('XLA_FLAGS', '')),
              CM_JAX_COORDINATOR=f'127.0.0.1:{port}', CM_JAX_NUM_PROCESSES=str(num_processes))
  processes = []
  for i in range(num_processes):
    out = None
    if log_dir is not None:
      pathlib.Path(log_dir).mkdir(parents=True, exist_ok=True)
      out = open(pathlib.Path(log_dir) / f'process_{i}.log', 'w')  # pylint: disable=consider-using-with
    processes.append(subprocess.Popen(
        [sys.executable, '-m', 'cm_jax.main', *main_args], cwd=ROOT, env=dict(base, CM_JAX_PROCESS_ID=str(i)),
        stdout=out, stderr=subprocess.STDOUT if out else None, start_new_session=True))
    if out is not None:
      out.close()  # the child holds its own copy
  return processes


def kill(processes):
  """SIGKILLs the processes still running and reaps them."""
  for p in processes:
    if p.poll() is None:
      p.kill()
  for p in processes:
    p.wait()


def wait(processes, timeout: float) -> list[int]:
  """Exit codes of all processes; kills the rest when one fails, and all of them after `timeout` seconds."""
  deadline = time.monotonic() + timeout
  try:
    while any(p.poll() is None for p in processes) and not any(p.poll() for p in processes):
      if time.monotonic() > deadline:
        raise TimeoutError(f'{len(processes)} processes still running after {timeout:.0f} s.')
      time.sleep(0.05)
  finally:
    kill(processes)
  return [p.returncode for p in processes]


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--num_processes', type=int, default=2)
  parser.add_argument('--devices_per_process', type=int, default=4)
  parser.add_argument('--log_dir', default=None, help='Write process_<i>.log here instead of to the terminal.')
  parser.add_argument('--timeout', type=float, default=3600.0, help='Kill every process after this many seconds.')
  parser.add_argument('main_args', nargs=argparse.REMAINDER, help='-- then the arguments of cm_jax.main.')
  args = parser.parse_args()
  main_args = args.main_args[1:] if args.main_args[:1] == ['--'] else args.main_args
  processes = start(main_args, args.num_processes, args.devices_per_process, args.log_dir)
  preempt = lambda signum, frame: [p.send_signal(signal.SIGTERM) for p in processes if p.poll() is None]
  signal.signal(signal.SIGTERM, preempt)
  signal.signal(signal.SIGINT, preempt)
  codes = wait(processes, args.timeout)
  print(f'exit codes: {codes}')
  sys.exit(next((c for c in codes if c), 0))


if __name__ == '__main__':
  main()
