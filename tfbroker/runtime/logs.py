"""One log format for every tfbroker process, and TensorFlow's start-up chatter kept out of it.

Every process (broker, workers, I/O batchers, the frontends' gunicorn master and workers)
logs one line per event to stderr, in the same shape:

    2026-11-30 10:48:33,897 INFO [broker 11423] tfbroker.versions: serving model mlp version 1

or, with ``--log_format=json`` (TFBROKER_LOG_FORMAT, inherited by every child), one JSON
object per line for log collectors: time (ISO 8601, UTC), level, role, pid, logger,
message, and exc_info when there is a traceback.

TensorFlow writes its C++ notes (oneDNN, CUDA stubs, CPU features, MLIR) straight to file
descriptor 2 while it imports and loads a model, before anything can configure it, and its
v1 loader logs deprecation notices once per worker. ``tensorflow_output()`` captures file
descriptor 2 around that start-up and passes on only what an operator must see (errors and
fatal lines, as log records of ``tensorflow.cc``); ``--verbose`` (TFBROKER_VERBOSE=1) or the
usual TF_CPP_MIN_LOG_LEVEL=0 shows everything, unfiltered.

After start-up a model worker's fd 2 is a pipe the broker reads (TFBROKER_TF_OUTPUT_FD,
``relay_output_to_broker``): what TensorFlow writes while serving (a kernel's notes on a bad
request, the CHECK that fails as it aborts) becomes log records in this format, with the
worker's role and pid and TensorFlow's level (``log_child_lines``). The broker reads it, not
the worker, so even the line a worker writes as it dies is kept.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import re
import sys
import tempfile
from typing import Any, Iterator

LOG_FORMAT_ENV = "TFBROKER_LOG_FORMAT"  # text (default) or json
TF_OUTPUT_FD_ENV = "TFBROKER_TF_OUTPUT_FD"  # a model worker's pipe to the broker for its fd 2
VERBOSE_ENV = "TFBROKER_VERBOSE"  # 1: TensorFlow's own logs unfiltered
LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s [%(role)s %(process)d] %(name)s: %(message)s"

_role = ["tfbroker"]  # set by set_role (with the process title): read when a record is formatted

# absl's prefix on TensorFlow's C++ lines: severity, date, time, thread, file:line]
_ABSL_LINE = re.compile(rb"^([IWEF])\d{4} [\d:.]+\s+\d+ ([^\]]+)\] (.*)$")
_ABSL_PREAMBLE = b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"
# What a CPU-only worker always says once: not news to an operator who gave it no GPU.
_NO_GPU = re.compile(rb"failed call to cuInit|Could not find cuda drivers")


def set_role(role: str) -> None:
    _role[0] = role


class _RoleFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "role"):  # a child's line relayed by the broker carries its own
            record.role = _role[0]
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc).isoformat(
                timespec="milliseconds"),
            "level": record.levelname,
            "role": getattr(record, "role", _role[0]),
            "pid": record.process,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def log_format() -> str:
    fmt = os.environ.get(LOG_FORMAT_ENV, "text")
    return fmt if fmt in LOG_FORMATS else "text"


def formatter() -> logging.Formatter:
    return JsonFormatter() if log_format() == "json" else logging.Formatter(TEXT_FORMAT)


def handler() -> logging.Handler:
    """A stderr handler in this process's format (gunicorn's loggers get these too)."""
    out = logging.StreamHandler(sys.stderr)
    out.setFormatter(formatter())
    out.addFilter(_RoleFilter())
    return out


def setup_logging(level: str, role: str) -> None:
    set_role(role)
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler())
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    if not verbose():
        # "Restoring parameters from ...", one per worker: TensorFlow's info is not ours to show.
        logging.getLogger("tensorflow").setLevel(logging.WARNING)


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV) == "1" or os.environ.get("TF_CPP_MIN_LOG_LEVEL") == "0"


@contextlib.contextmanager
def tensorflow_output(*, cpu_only: bool = False) -> Iterator[None]:
    """Capture what TensorFlow's C++ writes to fd 2 inside the block; log its errors after.

    A temporary file rather than a pipe, so nothing blocks however much is written. Python's
    own logging keeps going to the real stderr meanwhile (its handler holds a duplicate).
    """
    if verbose():
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    real_stderr = os.fdopen(os.dup(saved), "w", buffering=1)
    moved = _point_handlers_at(real_stderr)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            _point_handlers_at(sys.stderr, moved)
            real_stderr.close()
            capture.seek(0)
            pass_on_tensorflow_output(capture.read(), cpu_only=cpu_only)


def _point_handlers_at(stream: object, only: list[logging.StreamHandler] | None = None
                       ) -> list[logging.StreamHandler]:
    handlers = only if only is not None else [
        h for h in logging.getLogger().handlers
        if isinstance(h, logging.StreamHandler) and getattr(h, "stream", None) in (sys.stderr, sys.__stderr__)]
    for h in handlers:
        h.setStream(stream)  # type: ignore[arg-type]
    return handlers


def relay_output_to_broker() -> None:
    """In a model worker after start-up: fd 2 (TensorFlow's C++ output, and anything else
    written to it) goes to the broker's pipe; this process's own log records keep going to
    the real stderr. Nothing changes without the pipe, or with --verbose (raw, as asked)."""
    fd = os.environ.get(TF_OUTPUT_FD_ENV)
    if not fd or verbose():
        return
    sys.stderr.flush()
    real_stderr = os.fdopen(os.dup(2), "w", buffering=1)
    _point_handlers_at(real_stderr)
    os.dup2(int(fd), 2)
    os.close(int(fd))


_LEVELS = {b"I": logging.INFO, b"W": logging.WARNING, b"E": logging.ERROR, b"F": logging.CRITICAL}
# glog's stack trace after a failed CHECK: native frames, no use in a log line each.
_STACK_LINE = re.compile(rb"^\*\*\* Check failure stack trace|^\s+@\s+0x")
# Where in the graph an error arose, on a line of its own: nothing an operator can act on.
_GRAPH_LINE = re.compile(rb"^\s+\[\[\{\{")


def log_child_lines(lines: list[bytes], role: str, pid: int, *, cpu_only: bool) -> None:
    """Lines a child wrote to its fd 2, as records of ``tensorflow.cc`` with the child's role
    and pid: absl's lines at their own level (an indented line after one is part of it; the
    graph's ``[[{{node …}}]]`` is dropped), any other line as a warning."""
    log = logging.getLogger("tensorflow.cc")
    entries: list[list[Any]] = []  # [level, text]
    for line in lines:
        if not line.strip() or line.startswith(_ABSL_PREAMBLE) or _STACK_LINE.match(line):
            continue
        if line[:1].isspace() and entries:
            if not _GRAPH_LINE.match(line):
                entries[-1][1] += " " + line.decode(errors="replace").strip()
            continue
        match = _ABSL_LINE.match(line)
        if match is None:
            entries.append([logging.WARNING, line.decode(errors="replace")])
            continue
        severity, where, message = match.groups()
        if cpu_only and _NO_GPU.search(message):
            continue
        entries.append([_LEVELS[severity], f"{message.decode(errors='replace')} ({where.decode(errors='replace')})"])
    for level, text in entries:
        if log.isEnabledFor(level):
            record = log.makeRecord(log.name, level, "(child)", 0, "%s", (text,), None)
            record.role, record.process = role, pid
            log.handle(record)


def pass_on_tensorflow_output(captured: bytes, *, cpu_only: bool) -> None:
    """Errors and fatal lines as log records; info and warnings dropped with the lines that
    continue them; anything else (a library printing) passed on as a warning."""
    log = logging.getLogger("tensorflow.cc")
    dropping = False
    for line in captured.splitlines():
        if not line.strip() or line.startswith(_ABSL_PREAMBLE):
            continue
        match = _ABSL_LINE.match(line)
        if match is None:
            if not dropping:
                log.warning("%s", line.decode(errors="replace"))
            continue
        severity, where, text = match.groups()
        dropping = severity not in (b"E", b"F") or (cpu_only and _NO_GPU.search(text) is not None)
        if not dropping:
            log.log(logging.CRITICAL if severity == b"F" else logging.ERROR, "%s (%s)",
                    text.decode(errors="replace"), where.decode(errors="replace"))
