"""What every tfbroker process does first: its title, its logging, and dying with its parent."""

from __future__ import annotations

import ctypes
import faulthandler
import gc
import os
import signal
import sys

import setproctitle

from tfbroker.runtime.logs import set_role, setup_logging  # noqa: F401 - setup_logging: every role's start-up

PARENT_PID_ENV = "TFBROKER_PARENT_PID"

# Exit codes a supervisor (systemd, the broker) reads: restart on a fault, never on a
# configuration error or a model that cannot load (gunicorn's WORKER_BOOT_ERROR idea).
EXIT_OK = 0
EXIT_FAULT = 1  # a runtime fault (port or runtime directory in use, an unexpected error): restart
EXIT_CONFIG_ERROR = 2  # bad flags, config files or keys (argparse's code too): do not restart
EXIT_BOOT_ERROR = 3  # a child that cannot start (its broker is gone): do not restart
EXIT_MODEL_LOAD_ERROR = 4  # a worker whose model does not load: do not restart

_PR_SET_PDEATHSIG = 1


def set_title(role: str) -> None:
    """``tfbroker: ROLE`` in ps and top, so operators and tests find a process by its role."""
    setproctitle.setproctitle(f"tfbroker: {role}")
    set_role(role)  # and in every log line


def die_with_parent() -> None:
    """Ask the kernel for SIGTERM when the spawning broker dies, and exit if it already has.

    Only for processes the broker spawned (it sets TFBROKER_PARENT_PID); a frontend under
    gunicorn has gunicorn as its parent and gunicorn's own supervision.
    """
    expected = os.environ.get(PARENT_PID_ENV)
    if not expected:
        return
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != int(expected):
        sys.exit(EXIT_BOOT_ERROR)


# The signal that makes a process write every thread's stack to stderr, on demand: the
# broker sends it to a child that stopped answering before it terminates it.
DUMP_SIGNAL = signal.SIGUSR1


def enable_fault_dumps() -> None:
    """Stacks to stderr on a crash (SIGSEGV, SIGABRT…) and on SIGUSR1, never on a stop.

    Written by faulthandler in C, so they come even from a process stuck in a model call,
    where no Python handler can run. On a duplicate of stderr: TensorFlow's start-up output
    is captured (tfbroker/runtime/logs.py), a stack dump must not be.
    """
    fault_log = os.fdopen(os.dup(sys.stderr.fileno()), "w")
    faulthandler.enable(fault_log)
    faulthandler.register(DUMP_SIGNAL, file=fault_log, all_threads=True)


# Young objects collected every this many allocations instead of Python's 700: a busy
# broker makes ~10 tracked objects per request (header, Task, frame lists) that live for a
# batch, and a frontend a few dozen, so at 700 the collector ran every few dozen requests
# (9 % of the broker's CPU at c=256, perf under bench). Interleaved runs of 700, 5,000 and
# 50,000: 5,000 gave the most requests/s and the lowest p99; at 50,000 each collection
# walks so many objects that its pause raised p99 by a third.
GC_YOUNG_THRESHOLD = 5_000


def quiet_gc() -> None:
    """Once start-up is done: keep what it made out of every later collection (gc.freeze)
    and collect young objects less often (GC_YOUNG_THRESHOLD)."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, older, oldest)


def parent_alive() -> bool:
    """False once the broker that spawned this process is gone (we were re-parented)."""
    expected = os.environ.get(PARENT_PID_ENV)
    return not expected or os.getppid() == int(expected)
