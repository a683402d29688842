"""CURVE on the network: the ZeroMQ Guide's Ironhouse pattern, with pyzmq's authenticator.

The broker has one key pair (``--curve_secret_key_file``, a certificate written by
``python -m broker.ctl keygen``). Its sockets are CURVE servers; a client (frontend, Python
client, ``broker.ctl``, a worker) must know the broker's public key and present a key pair
whose public key is in ``--curve_client_keys_dir`` (or is the broker's own: the workers it
spawns use its key pair). Unknown keys are refused during the handshake and counted.
Without CURVE every address must be ipc:// or loopback.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from typing import Any

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from tfbroker.wire.errors import ConfigError

log = logging.getLogger("tfbroker.security")

# What a client process reads to reach a CURVE broker (frontends, workers, the client).
CLIENT_SECRET_KEY_ENV = "TFBROKER_CURVE_SECRET_KEY_FILE"  # the client's certificate (public + secret)
SERVER_KEY_ENV = "TFBROKER_CURVE_SERVER_KEY_FILE"  # the broker's public certificate


@dataclass(frozen=True, slots=True)
class KeyPair:
    public: bytes
    secret: bytes


def load_key_pair(path: str) -> KeyPair:
    """A certificate with its secret key (``NAME.key_secret``); ConfigError if unusable."""
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read CURVE key file {path}: {exc}") from exc
    if secret is None:
        raise ConfigError(f"CURVE key file {path} holds no secret key (use the .key_secret file)")
    return KeyPair(public, secret)


def load_public_key(path: str) -> bytes:
    try:
        public, _ = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read CURVE public key file {path}: {exc}") from exc
    return public


def generate(directory: str, name: str) -> tuple[str, str]:
    """Write NAME.key (public) and NAME.key_secret in ``directory``; their paths."""
    os.makedirs(directory, exist_ok=True)
    public, secret = zmq.auth.create_certificates(directory, name)
    os.chmod(secret, 0o600)
    return public, secret


def make_server(sock: zmq.Socket[Any], keys: KeyPair) -> None:
    sock.curve_secretkey = keys.secret
    sock.curve_publickey = keys.public
    sock.curve_server = True


def make_client(sock: zmq.Socket[Any], keys: KeyPair, server_public: bytes) -> None:
    sock.curve_secretkey = keys.secret
    sock.curve_publickey = keys.public
    sock.curve_serverkey = server_public


def client_keys_from_env() -> tuple[KeyPair, bytes] | None:
    """The client key pair and broker key named by the environment, or None (no CURVE)."""
    secret_file, server_file = os.environ.get(CLIENT_SECRET_KEY_ENV), os.environ.get(SERVER_KEY_ENV)
    if not secret_file and not server_file:
        return None
    if not (secret_file and server_file):
        raise ConfigError(f"CURVE needs both {CLIENT_SECRET_KEY_ENV} and {SERVER_KEY_ENV}")
    return load_key_pair(secret_file), load_public_key(server_file)


class KeyRing:
    """The public keys allowed in, read from a directory of certificates, and the count of
    handshakes refused. Runs in the authenticator's thread."""

    def __init__(self, directory: str, also: bytes) -> None:
        self.directory = directory
        self.refused = 0
        self._lock = threading.Lock()
        self._allowed = {also} if also else set()  # z85, as certificates hold it
        self._allowed |= set(zmq.auth.load_certificates(directory)) if directory else set()

    def callback(self, domain: str, z85_key: bytes) -> bool:
        if z85_key in self._allowed:
            return True
        with self._lock:
            self.refused += 1
        log.warning("refused a CURVE client with an unknown public key %s", z85_key.decode()[:12] + "…")
        return False


def start_authenticator(context: zmq.Context[Any], keys: KeyPair, client_keys_dir: str) -> tuple[ThreadAuthenticator,
                                                                                          KeyRing]:
    """pyzmq's ZAP handler for every CURVE socket of ``context``."""
    ring = KeyRing(client_keys_dir, keys.public)
    auth = ThreadAuthenticator(context, log=logging.getLogger("tfbroker.zap"))
    auth.start()
    auth.configure_curve_callback("*", credentials_provider=ring)
    return auth, ring
