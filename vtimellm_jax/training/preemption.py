"""Stopping a training run cleanly on SIGTERM or SIGINT.

A preempted Cloud TPU spot VM, SLURM before it kills a job, and Ctrl-C all send a signal first. The
run finishes the step it is in, saves a checkpoint at that step and stops; `train` then exits with
`EXIT_STATUS` (128 + the signal number, as a shell reports a process killed by it), so a launcher
can tell a stop it should resume from a failure. A second signal acts as if no handler were
installed (SIGINT raises KeyboardInterrupt at once). In a multi-process run every process stops
after the same step: the decision is an all-gather of each process's flag after every step.
"""

from __future__ import annotations

import signal
import threading

import jax
import numpy as np
from jax.experimental import multihost_utils

SIGNALS = (signal.SIGTERM, signal.SIGINT)
EXIT_STATUS = {signal.SIGTERM.name: 128 + signal.SIGTERM, signal.SIGINT.name: 128 + signal.SIGINT}


class StopOnSignal:
  """Context manager: records the first SIGTERM or SIGINT instead of dying; `requested()` asks every process."""

  def __init__(self):
    self.received: signal.Signals | None = None
    self._previous = {}

  def __enter__(self) -> "StopOnSignal":
    if threading.current_thread() is threading.main_thread():  # only the main thread may set handlers
      for sig in SIGNALS:
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous = {}

  def _handle(self, signum, frame) -> None:
    del frame
    self.received = signal.Signals(signum)
    # A second signal is not deferred: the previous handlers come back now.
    self.__exit__()

  def requested(self) -> str | None:
    """Returns the name of the signal that stops the run (any process's), or None to go on."""
    if jax.process_count() == 1:
      return self.received.name if self.received else None
    code = int(self.received) if self.received else 0
    codes = multihost_utils.process_allgather(np.int32(code))
    stop = int(np.max(codes))
    return signal.Signals(stop).name if stop else None
