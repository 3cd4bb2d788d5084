"""The processes of one run: joining them before JAX starts, and stopping them together on preemption.

A process learns how to join its run in one of three ways, tried in this order:
  1. explicit: --coordinator_address, --num_processes and --process_id, or the environment variables
     CM_JAX_COORDINATOR (host:port of process 0), CM_JAX_NUM_PROCESSES and CM_JAX_PROCESS_ID
     (launch/local_multiprocess.py, launch/kubernetes_jobset.yaml);
  2. automatic: on a Cloud TPU VM, in a Slurm job step with several tasks, or with CM_JAX_DISTRIBUTED=auto,
     `jax.distributed.initialize()` without arguments reads the cluster's own description
     (launch/tpu_vm.sh, launch/slurm_gpu.sbatch);
  3. otherwise the run is a single process and nothing is joined. CM_JAX_DISTRIBUTED=off forces this.

Preemption: a SIGTERM to any process makes every process save a checkpoint at the same step and stop
(`PreemptionWatch`).
"""

import dataclasses
import glob
import importlib.util
import os
import signal
import threading

from absl import logging
import jax
from jax.experimental import multihost_utils

ENV_COORDINATOR = 'CM_JAX_COORDINATOR'
ENV_NUM_PROCESSES = 'CM_JAX_NUM_PROCESSES'
ENV_PROCESS_ID = 'CM_JAX_PROCESS_ID'
ENV_MODE = 'CM_JAX_DISTRIBUTED'  # 'auto' or 'off'; unset: decided by the rules above


@dataclasses.dataclass(frozen=True)
class Plan:
  """How this process joins its run: kind is 'single', 'explicit' or 'auto' (the cluster tells JAX)."""
  kind: str
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None


def _on_cloud_tpu_vm() -> bool:
  """True on a Cloud TPU VM: libtpu is installed and TPU chips are attached (/dev/accel* or /dev/vfio/N)."""
  return (importlib.util.find_spec('libtpu') is not None
          and bool(glob.glob('/dev/accel*') or glob.glob('/dev/vfio/[0-9]*')))


def _in_slurm_step_with_several_tasks(environ) -> bool:
  return 'SLURM_JOB_ID' in environ and int(environ.get('SLURM_NTASKS', '1')) > 1


def plan(coordinator_address=None, num_processes=None, process_id=None, environ=None) -> Plan:
  """How to join: flags first, then CM_JAX_* variables, then the cluster this process runs in."""
  environ = os.environ if environ is None else environ
  explicit = {
      '--coordinator_address': coordinator_address or environ.get(ENV_COORDINATOR),
      '--num_processes': num_processes if num_processes is not None else environ.get(ENV_NUM_PROCESSES),
      '--process_id': process_id if process_id is not None else environ.get(ENV_PROCESS_ID),
  }
  given = {k: v for k, v in explicit.items() if v not in (None, '')}
  mode = environ.get(ENV_MODE, '')
  if mode not in ('', 'auto', 'off'):
    raise ValueError(f"{ENV_MODE}={mode!r}; expected 'auto', 'off' or unset.")
  if mode == 'off':
    return Plan('single')
  if given:
    missing = [k for k in explicit if k not in given]
    if missing:
      raise ValueError(f'Joining a multi-process run needs --coordinator_address, --num_processes and '
                       f'--process_id (or {ENV_COORDINATOR}, {ENV_NUM_PROCESSES}, {ENV_PROCESS_ID}); '
                       f'missing: {", ".join(missing)}.')
    count, index = int(given['--num_processes']), int(given['--process_id'])
    if not 0 <= index < count:
      raise ValueError(f'--process_id={index} is not in [0, --num_processes={count}).')
    return Plan('explicit', given['--coordinator_address'], count, index)
  if mode == 'auto' or _in_slurm_step_with_several_tasks(environ) or _on_cloud_tpu_vm():
    return Plan('auto')
  return Plan('single')


def initialize(how: Plan) -> None:
  """Joins the run as planned (nothing for a single process). Call before anything touches devices."""
  if how.kind == 'single':
    return
  if how.kind == 'explicit':
    jax.distributed.initialize(how.coordinator_address, how.num_processes, how.process_id)
  else:
    jax.distributed.initialize()
  logging.info('Joined a run of %d processes as process %d (%s).', jax.process_count(), jax.process_index(),
               how.kind)


class Preempted(BaseException):
  """The run stopped at a preemption sync point after saving a checkpoint there; rerun to resume.

  A BaseException, like KeyboardInterrupt: raised from the SIGTERM handler wherever the main thread is (an import,
  a library call), it must not be swallowed by a library's `except Exception`.
  """


def stop_on_sigterm() -> None:
  """Outside the training steps, a SIGTERM to a lone process stops it at once (distributed.Preempted): during start-up,
  compilation before the loop, sampling or evaluation. Checkpoints are written only inside the loop, where
  PreemptionWatch takes over; with jax.distributed initialised, JAX's runtime handles SIGTERM instead."""
  if not jax.distributed.is_initialized() and threading.current_thread() is threading.main_thread():
    signal.signal(signal.SIGTERM, _raise_preempted)


class PreemptedOutsideSteps(Preempted):
  """A SIGTERM outside the training steps: the process exits at once (os._exit), since JAX may be mid-compilation."""


def _raise_preempted(signum, frame):
  del signum, frame
  raise PreemptedOutsideSteps('Preempted outside the training steps (SIGTERM): stopped without writing anything; run '
                              'the same command again to continue from the last checkpoint.')


class PreemptionWatch:
  """Says at which step to save and stop after a SIGTERM reached any process; the same step on all of them.

  With jax.distributed initialised, JAX's runtime catches SIGTERM and the processes agree on a sync step
  (`multihost_utils.reached_preemption_sync_point`, to be asked at every step). A lone process catches
  SIGTERM itself and stops at its next step. Use as a context manager: the old SIGTERM handler comes back
  on exit.
  """

  def __init__(self):
    self._signalled = threading.Event()
    self._previous = None

  def __enter__(self):
    if not jax.distributed.is_initialized() and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
    return self

  def __exit__(self, *exc_info):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None

  def _on_sigterm(self, signum, frame):
    del signum, frame
    logging.warning('SIGTERM: saving a checkpoint at the next step, then stopping.')
    self._signalled.set()

  def reached(self, step: int) -> bool:
    """True when this process must save at `step` and stop; ask once per step, in step order."""
    if jax.distributed.is_initialized():
      return multihost_utils.reached_preemption_sync_point(step)
    return self._signalled.is_set()
