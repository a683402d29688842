"""``python -m workers.zygote``: the process every model worker is forked from.

It imports TensorFlow and the worker's code once and does nothing else: no device is
initialised (no eager context, no ``list_physical_devices``, no CUDA context), no ZeroMQ
context, no threads of ours. Then it forks one worker per request from the broker
(tfbroker/runtime/forking.py). A fork shares every page the import made until it writes to
it, and starts in a fraction of a second: what a worker adds is its own model.

Each worker is forked twice over: the first child starts a session of its own and forks the
worker, then exits at once, so the worker becomes the broker's child (the broker is its
descendants' subreaper). The broker then reaps it and reads its exit status itself, and the
worker lives on when the zygote dies. The worker sets its device (CUDA_VISIBLE_DEVICES,
before TensorFlow's first device use), title, signals, logging and ZeroMQ context as a
spawned one does (workers/worker.py).

``gc.freeze()`` before the first fork moves everything the import made out of the cycle
collector's reach, so a collection in a worker does not write to (and copy) those pages.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import select
import socket
import sys
import threading
import time
import traceback
from typing import Any

from tfbroker.runtime import forking
from tfbroker.runtime.devices import visible_gpus
from tfbroker.runtime.logs import tensorflow_output
from tfbroker.runtime.process import (EXIT_BOOT_ERROR, EXIT_OK, die_with_parent, enable_fault_dumps, set_title,
                                      setup_logging)

log = logging.getLogger("tfbroker.zygote")

REPARENT_TIMEOUT_S = 5.0  # how long a fork waits to become the broker's child


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workers.zygote", description=__doc__)
    parser.add_argument("--log_level", default="info")
    args = parser.parse_args(argv)
    set_title("zygote")
    setup_logging(args.log_level, "zygote")
    die_with_parent()
    enable_fault_dumps()
    broker_pid = os.getppid()
    sock = socket.socket(fileno=int(os.environ.pop(forking.ZYGOTE_FD_ENV)))
    started = time.monotonic()
    try:
        with tensorflow_output(cpu_only=not visible_gpus()):
            import tensorflow

            from workers import batch, model, tflite_model, warmup, worker  # noqa: F401 - what every worker runs
    except Exception as exc:  # noqa: BLE001 - any failure: the workers start as fresh interpreters
        log.error("cannot import TensorFlow and the worker: %s", exc)
        return EXIT_BOOT_ERROR
    report = start_report(tensorflow.__version__, time.monotonic() - started)
    others = [t["tid"] for t in report["threads"] if t["tid"] != os.getpid()]
    log.info("ready in %.1f s: TensorFlow %s imported; %d threads (the main one, and %s started by the imports: "
             "threads %s); eager context: %s; devices listed: %s", report["import_s"], report["tensorflow"],
             len(report["threads"]), len(others), others, report["eager_context"], report["devices_listed"])
    gc.collect()
    gc.freeze()
    try:
        forking.send(sock, {"hello": report})
        serve(sock, broker_pid)
    except forking.ChannelError as exc:
        log.debug("the broker's channel: %s", exc)
    return EXIT_OK


def start_report(version: str, import_s: float) -> dict[str, Any]:
    """What the zygote is before its first fork: its threads (TensorFlow's import starts
    one of its own), and that it initialised no device."""
    from tensorflow.python.eager import context

    eager = context._context  # created by the first eager op or device query, never here
    threads = []
    for tid in sorted(os.listdir("/proc/self/task"), key=int):
        try:
            with open(f"/proc/self/task/{tid}/comm", encoding="utf-8") as fh:
                threads.append({"tid": int(tid), "name": fh.read().strip()})
        except OSError:
            continue
    return {"tensorflow": version, "import_s": round(import_s, 2), "pid": os.getpid(), "threads": threads,
            "python_threads": [t.name for t in threading.enumerate()],
            "eager_context": eager is not None,
            "devices_listed": eager is not None and getattr(eager, "_physical_devices", None) is not None}


def serve(sock: socket.socket, broker_pid: int) -> None:
    """Fork one worker per request, until the broker closes the channel."""
    while True:
        message, fds = forking.receive(sock)
        number = message.get("fork")
        try:
            pid = fork_worker(message, fds, sock, broker_pid)
            reply: dict[str, Any] = {"fork": number, "pid": pid}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.error("cannot fork a worker: %s", exc)
            reply = {"fork": number, "error": str(exc)}
        finally:
            for fd in fds:
                os.close(fd)
        forking.send(sock, reply)


def fork_worker(message: dict[str, Any], fds: list[int], sock: socket.socket, broker_pid: int) -> int:
    """Fork a worker that belongs to the broker; its pid."""
    argv, env, fd_env = list(message["argv"]), dict(message["env"]), list(message["fd_env"])
    if len(fd_env) != len(fds) or not all(isinstance(a, str) for a in argv):
        raise ValueError("a fork request names other file descriptors than it carries")
    read_end, write_end = os.pipe()
    first = os.fork()
    if first == 0:  # the go-between: a session of its own, the worker, and gone
        code = 1
        try:
            os.close(read_end)
            os.setsid()
            pid = os.fork()
            if pid == 0:
                os.close(write_end)
                become_worker(argv, {**env, **{name: str(fd) for name, fd in zip(fd_env, fds)}}, sock, broker_pid)
            os.write(write_end, str(pid).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    try:
        text = os.read(read_end, 32)
    finally:
        os.close(read_end)
        os.waitpid(first, 0)  # once reaped, the worker is the broker's child
    if not text:
        raise OSError("the go-between exited before it forked the worker")
    return int(text)


def wait_for_broker(broker_pid: int) -> None:
    """Until the go-between has exited and this process is the broker's child (its pidfd turns
    readable once it has exited, its children already handed on); EXIT_BOOT_ERROR if not."""
    go_between = os.getppid()
    if go_between != broker_pid:
        try:
            pidfd = os.pidfd_open(go_between)
        except ProcessLookupError:  # gone already
            pidfd = -1
        if pidfd >= 0:
            try:
                select.select([pidfd], [], [], REPARENT_TIMEOUT_S)
            finally:
                os.close(pidfd)
    if os.getppid() != broker_pid:
        raise SystemExit(EXIT_BOOT_ERROR)


def become_worker(argv: list[str], env: dict[str, str], sock: socket.socket, broker_pid: int) -> None:
    """The forked worker: run ``python -m workers`` with ``argv``; never returns."""
    code: Any = 1
    try:
        sock.close()
        os.environ.update(env)
        wait_for_broker(broker_pid)
        from workers.__main__ import main as worker_main

        worker_main(argv)
        code = EXIT_OK
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (EXIT_OK if exc.code is None else 1)
    except BaseException:  # noqa: BLE001 - whatever it is, the worker goes with its traceback
        traceback.print_exc()
    finally:
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
