"""Start-up and shut-down of the broker process around broker.server.Broker."""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import logging
import os
import shutil
import subprocess
import sys
from typing import IO

import zmq

from broker.config import BatchingParameters, ModelConfig, ServerConfig
from broker.config_files import load_batching_parameters, load_metrics_path, load_model_config
from tfbroker.runtime.devices import visible_gpus
from tfbroker.runtime.logs import LOG_FORMAT_ENV, VERBOSE_ENV, pass_on_tensorflow_output, verbose
from tfbroker.runtime import tracing
from tfbroker.runtime.process import EXIT_CONFIG_ERROR, EXIT_FAULT, EXIT_OK, set_title, setup_logging
from broker.server import Broker
from tfbroker.wire.errors import ConfigError

log = logging.getLogger("tfbroker.broker")

DEMO_MODELS = ("half_plus_two", "mlp", "text")


def run(config: ServerConfig) -> int:
    """Exit codes (tfbroker/runtime/process.py): 0 stopped cleanly; EXIT_CONFIG_ERROR for what a restart
    cannot fix (flags, config files, keys); EXIT_FAULT for what it may (a port or runtime
    directory in use, an unexpected error)."""
    # Every child inherits these: one log format, and TensorFlow's start-up notes only with --verbose.
    os.environ[LOG_FORMAT_ENV] = config.log_format
    os.environ[VERBOSE_ENV] = "1" if config.verbose else "0"
    tracing.configure(os.environ, config.otel_traces_endpoint,
                      config.otel_traces_sampling_rate if config.otel_traces_sampling_rate >= 0 else None)
    set_title("broker")
    setup_logging(config.log_level, "broker")
    try:
        check_server_install()
        models = resolve_models(config)
        batching = (load_batching_parameters(config.batching_parameters_file)
                    if config.batching_parameters_file else BatchingParameters())
        metrics_path = load_metrics_path(config.monitoring_config_file) if config.monitoring_config_file else ""
        broker = Broker(config, models, batching, metrics_path)
    except ConfigError as exc:
        log.error("%s", exc)
        return EXIT_CONFIG_ERROR
    try:
        lock = lock_runtime_dir(config.resolved_runtime_dir)
    except OSError as exc:
        log.error("%s", exc)
        return EXIT_FAULT
    try:
        broker.bind()
        broker.run_forever()
    except zmq.ZMQError as exc:
        log.error("cannot bind the broker's sockets: %s", exc)
        return EXIT_FAULT
    except OSError as exc:  # the HTTP port is taken, say
        log.error("%s", exc)
        broker.stop_children()
        return EXIT_FAULT
    except Exception:  # noqa: BLE001 - logged with its traceback; systemd restarts the broker
        log.exception("the broker failed")
        broker.stop_children()
        return EXIT_FAULT
    finally:
        broker.close()
        lock.close()
        clean_runtime_dir(config.resolved_runtime_dir)  # a failed start leaves nothing behind either
    return EXIT_OK


# What the broker puts in its runtime directory: its sockets, its lock, the frontends' shared
# counters and the ready message's example bodies.
RUNTIME_FILES = ("frontend.sock", "backend.sock", "control.sock", "broker.lock")
RUNTIME_DIRS = ("metrics", "examples")


def clean_runtime_dir(runtime_dir: str) -> None:
    """After a clean stop: what the broker made goes, and the directory too once empty (a
    crash leaves them, and the next start takes them over: sockets are bound afresh, the lock
    is an flock, not the file's existence)."""
    for name in RUNTIME_FILES:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(runtime_dir, name))
    for name in RUNTIME_DIRS:
        shutil.rmtree(os.path.join(runtime_dir, name), ignore_errors=True)
    with contextlib.suppress(OSError):  # not empty: something of the operator's is in it
        os.rmdir(runtime_dir)


def check_server_install() -> None:
    """The broker itself never imports TensorFlow, but its workers do: say so at once on a
    light install (frontends and clients only) rather than as a worker that fails to load."""
    missing = [name for name in ("tensorflow", "tensorflow_serving") if importlib.util.find_spec(name) is None]
    if missing:
        raise ConfigError(f"the broker's workers need {' and '.join(missing)}, which this installation lacks "
                         "(the light install is for frontends and clients): pip install 'tfbroker[server]'")


def resolve_models(config: ServerConfig) -> list[ModelConfig]:
    if config.model_config_file:
        return load_model_config(config.model_config_file)
    if config.model_name:
        return [ModelConfig(name=config.model_name, base_path=config.model_base_path)]
    demo_dir = config.demo_models_dir or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "tfbroker", "demo_models")
    make_demo_models(demo_dir)
    return [ModelConfig(name=name, base_path=os.path.join(demo_dir, name)) for name in DEMO_MODELS]


def make_demo_models(directory: str) -> None:
    """Build the demo SavedModels with TensorFlow, in a child so the broker never imports it."""
    if all(os.path.isdir(os.path.join(directory, name, "1")) for name in DEMO_MODELS):
        return
    log.info("making demo models in %s (once)", directory)
    result = subprocess.run([sys.executable, "-m", "workers.demo_models", directory], check=False,
                            stderr=None if verbose() else subprocess.PIPE, timeout=600)
    if result.stderr:
        pass_on_tensorflow_output(result.stderr, cpu_only=not visible_gpus())
    if result.returncode != 0:
        raise ConfigError(f"could not make the demo models in {directory}")


def lock_runtime_dir(runtime_dir: str) -> IO[str]:
    """One broker per runtime directory: a second would take over the first one's sockets."""
    os.makedirs(runtime_dir, mode=0o700, exist_ok=True)
    fh = open(os.path.join(runtime_dir, "broker.lock"), "a+")  # noqa: SIM115 - held for the lifetime
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as exc:
        fh.close()
        raise OSError(f"another broker is running with runtime directory {runtime_dir} (the same "
                      "--rest_api_port, or the same --runtime_dir): stop it, or pass another") from exc
    fh.seek(0)
    fh.truncate()
    fh.write(f"{os.getpid()}\n")
    fh.flush()
    return fh
