"""``python -m broker.ctl``: drive a running broker over its control socket.

    python -m broker.ctl status [MODEL]
    python -m broker.ctl reload-config
    python -m broker.ctl load MODEL VERSION [--wait]
    python -m broker.ctl unload MODEL VERSION [--wait]
    python -m broker.ctl label MODEL LABEL VERSION
    python -m broker.ctl drain MODEL VERSION [--wait]
    python -m broker.ctl keygen DIRECTORY NAME     (CURVE key pair: NAME.key, NAME.key_secret)

Exit status: 0 done, 1 the broker refused (the reason on stderr), 2 bad usage, 3 no answer.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from typing import Any, Sequence

import zmq

from tfbroker.wire import protocol
from tfbroker.runtime.settings import default_runtime_dir, ipc_address
from tfbroker.wire.errors import ProtocolError, TFBrokerError, from_code
from tfbroker.wire.security import (CLIENT_SECRET_KEY_ENV, SERVER_KEY_ENV, KeyPair, generate, load_key_pair,
                             load_public_key, make_client)

EXIT_REFUSED = 1
EXIT_NO_ANSWER = 3
WAIT_POLL_S = 0.2


class NoAnswer(Exception):
    pass


class ControlClient:
    """One DEALER to the broker's control socket; every call has a deadline."""

    def __init__(self, address: str, timeout_s: float = 10.0,
                 curve: tuple[KeyPair, bytes] | None = None) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self._context = zmq.Context()
        self._socket = self._context.socket(zmq.DEALER)
        self._socket.setsockopt(zmq.LINGER, 0)
        if curve is not None:
            make_client(self._socket, *curve)
        self._socket.connect(address)
        self._ids = itertools.count(1)

    def call(self, op: str, **args: Any) -> dict[str, Any]:
        """The broker's answer to one operation; raises the wire's TFBrokerError or NoAnswer."""
        request_id = next(self._ids)
        header = protocol.Control(id=request_id, op=op, args=protocol.ControlArgs(**args))  # type: ignore[arg-type]
        self._socket.send_multipart(protocol.encode(protocol.CONTROL, header))
        deadline = time.monotonic() + self.timeout_s
        while True:
            remaining_ms = int((deadline - time.monotonic()) * 1000)
            if remaining_ms <= 0 or not self._socket.poll(remaining_ms):
                raise NoAnswer(f"no answer from the broker's control socket {self.address} "
                               f"within {self.timeout_s:.0f} s: is the broker running (and are the CURVE keys "
                               "right, if it uses them)?")
            try:
                message = protocol.decode(self._socket.recv_multipart(), protocol.BROKER_TO_CLIENT)
            except ProtocolError:
                continue
            if message.header.id != request_id:
                continue  # a late answer to an earlier call
            if message.command == protocol.ERROR:
                raise from_code(message.header.code, message.header.message)
            if not isinstance(message.header, protocol.ControlReply):
                continue
            return dict(message.header.body)

    def close(self) -> None:
        self._context.destroy(linger=0)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "keygen":
        public, secret = generate(args.directory, args.name)
        print(f"public key (copy to the broker's --curve_client_keys_dir, or give to clients): {public}\n"
              f"secret key (keep it here): {secret}")
        return 0
    address = args.address or ipc_address(args.runtime_dir or default_runtime_dir(args.rest_api_port), "control.sock")
    try:
        curve = _curve(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if address.startswith("ipc://") and not os.path.exists(address[len("ipc://"):]):
        print(f"error: no broker here: {address[len('ipc://'):]} does not exist (is the broker running, "
              "and with this --runtime_dir?)", file=sys.stderr)
        return EXIT_NO_ANSWER
    client = ControlClient(address, args.timeout_s, curve)
    try:
        result = _run(client, args)
    except TFBrokerError as exc:
        print(f"error ({exc.http_status}): {exc.message}", file=sys.stderr)
        return EXIT_REFUSED
    except NoAnswer as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_NO_ANSWER
    finally:
        client.close()
    result.pop("id", None)
    if args.command == "status" and args.model and not any(m["name"] == args.model for m in result["models"]):
        print(f"error (404): no model {args.model} on this broker (it serves "
              f"{', '.join(sorted(m['name'] for m in result['models'])) or 'none'})", file=sys.stderr)
        return EXIT_REFUSED
    try:
        if args.json:
            print(json.dumps(result, indent=2, sort_keys=True))
        elif args.command == "status":
            print(format_status(result, args.model))
        else:
            print(result.get("message") or "\n".join(result.get("changes") or ["no change"]))
        sys.stdout.flush()
    except BrokenPipeError:  # `broker.ctl status | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
    return 0


def format_status(status: dict[str, Any], only: str | None = None) -> str:
    broker = status["broker"]
    lines = [f"broker pid {broker['pid']}, up {broker['uptime_s']:.0f} s, {broker['requests']} requests in "
             f"{broker['batches']} batches, swap policy {broker['swap_policy']}"]
    for model in status["models"]:
        if only and model["name"] != only:
            continue
        policy = model["version_policy"]
        kind = {"latest": f"latest {policy['num_versions']}", "all": "all",
                "specific": "specific " + ",".join(map(str, policy["versions"]))}[policy["kind"]]
        labels = ", ".join(f"{k}={v}" for k, v in model["labels"].items()) or "none"
        pending = model.get("pending_labels") or {}
        if pending:
            labels += " (waiting for their version: " + ", ".join(f"{k}={v}" for k, v in pending.items()) + ")"
        lines.append(f"\nmodel {model['name']}  ({model['base_path']}; policy {kind}; labels {labels})")
        lines.append(f"  {'version':>8}  {'state':<10} {'pid':>8} {'queued':>7} {'in flight':>9}  note")
        for v in reversed(model["versions"]):
            note = "draining" if v["draining"] else (v["error"] or "")
            lines.append(f"  {v['version']:>8}  {v['state']:<10} {v['pid'] or '-':>8} {v['queued']:>7} "
                         f"{v['in_flight']:>9}  {note}")
            replicas = v.get("replicas") or []
            if len(replicas) > 1 or any(r["device"].startswith("gpu") for r in replicas):
                for r in replicas:
                    lines.append(f"  {'':>8}  {r['device']:<10} {r['pid'] or '-':>8} {'':>7} {r['in_flight']:>9}  "
                                 f"{'ready' if r['ready'] else 'not ready'}, {r['batches']} batches, "
                                 f"{r['restarts']} restarts")
        if not model["versions"]:
            lines.append("  (no versions)")
    return "\n".join(lines)


# --- implementation ---

def _run(client: ControlClient, args: argparse.Namespace) -> dict[str, Any]:
    command = args.command
    if command == "status":
        return client.call("status")
    if command == "reload-config":
        return client.call("reload-config")
    if command == "label":
        return client.call("label", model=args.model, label=args.label, version=args.version)
    result = client.call(command, model=args.model, version=args.version)
    if args.wait:
        _wait(client, args.model, args.version, command, args.timeout_s)
    return result


def _wait(client: ControlClient, model: str, version: int, command: str, timeout_s: float) -> None:
    """Until the version is AVAILABLE (load), gone (unload) or holds no requests (drain)."""
    deadline = time.monotonic() + timeout_s
    while True:
        entry = _version_entry(client.call("status"), model, version)
        if command == "load" and entry and entry["state"] == "AVAILABLE" and not entry["draining"]:
            return
        if command == "load" and entry and entry["state"] == "END" and entry["error"]:
            raise from_code(500, f"version {version} failed to load: {entry['error']}")
        if command == "unload" and (entry is None or entry["state"] == "END"):
            return
        if command == "drain" and (entry is None or entry["queued"] + entry["in_flight"] == 0):
            return
        if time.monotonic() > deadline:
            state = entry["state"] if entry else "gone"
            raise NoAnswer(f"gave up waiting after {timeout_s:.0f} s: model {model} version {version} is {state}")
        time.sleep(WAIT_POLL_S)


def _version_entry(status: dict[str, Any], model: str, version: int) -> dict[str, Any] | None:
    for entry in status["models"]:
        if entry["name"] == model:
            return next((v for v in entry["versions"] if v["version"] == version), None)
    return None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m broker.ctl", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_options(parser)
    # The options also after the command (``status --json``): there they default to nothing,
    # so a value given before the command stands.
    options = argparse.ArgumentParser(add_help=False)
    _add_options(options, after_command=True)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    status = commands.add_parser("status", parents=[options], help="models, versions, states, labels")
    status.add_argument("model", nargs="?", help="only this model")
    commands.add_parser("reload-config", parents=[options], help="re-read --model_config_file")
    for name, text in (("load", "load a version (or send a drained one requests again)"),
                       ("unload", "unload a version after the requests it holds"),
                       ("drain", "stop sending a version new requests; it stays loaded")):
        sub = commands.add_parser(name, parents=[options], help=text)
        sub.add_argument("model")
        sub.add_argument("version", type=int)
        sub.add_argument("--wait", action="store_true", help="return once it is done (up to --timeout_s)")
    label = commands.add_parser("label", parents=[options], help="point a version label at an AVAILABLE version")
    label.add_argument("model")
    label.add_argument("label")
    label.add_argument("version", type=int)
    keygen = commands.add_parser("keygen", help="write a CURVE key pair (NAME.key public, NAME.key_secret secret)")
    keygen.add_argument("directory")
    keygen.add_argument("name")
    return parser


def _add_options(parser: argparse.ArgumentParser, *, after_command: bool = False) -> None:
    """The options every command takes, before or after it."""
    def default(value: Any) -> Any:
        return argparse.SUPPRESS if after_command else value

    parser.add_argument("--runtime_dir", default=default(""),
                        help="the broker's --runtime_dir (default: the broker's default)")
    parser.add_argument("--address", default=default(""), help="the broker's --control_address (overrides --runtime_dir)")
    parser.add_argument("--rest_api_port", type=int, default=default(8501),
                        help="the broker's --rest_api_port, which names its default runtime directory")
    parser.add_argument("--curve_secret_key_file", default=default(os.environ.get(CLIENT_SECRET_KEY_ENV, "")),
                        help=f"this client's CURVE key pair (.key_secret), for a broker that uses CURVE "
                             f"(default: ${CLIENT_SECRET_KEY_ENV})")
    parser.add_argument("--curve_server_key_file", default=default(os.environ.get(SERVER_KEY_ENV, "")),
                        help=f"the broker's public certificate (.key) (default: ${SERVER_KEY_ENV})")
    parser.add_argument("--timeout_s", type=float, default=default(10.0),
                        help="how long to wait for answers (and --wait)")
    parser.add_argument("--json", action="store_true", default=default(False), help="print the broker's answer as JSON")


def _curve(args: argparse.Namespace) -> tuple[KeyPair, bytes] | None:
    if not args.curve_secret_key_file and not args.curve_server_key_file:
        return None
    if not (args.curve_secret_key_file and args.curve_server_key_file):
        raise ValueError("CURVE needs both --curve_secret_key_file and --curve_server_key_file")
    return load_key_pair(args.curve_secret_key_file), load_public_key(args.curve_server_key_file)


if __name__ == "__main__":
    sys.exit(main())
