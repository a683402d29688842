"""The zygote's channel: how the broker asks it to fork a model worker.

One Unix socket pair per zygote (SOCK_SEQPACKET: one message per packet, never split or
merged), the zygote's end passed to it by number in TFBROKER_ZYGOTE_FD. Each message is a
msgpack map:

    zygote -> broker, once, when its imports are done:
        {"hello": REPORT}              what it imported, in how long, its threads, and that
                                       no device was initialised (workers/zygote.py)
    broker -> zygote, one per worker:
        {"fork": N, "argv": [...], "env": {...}, "fd_env": [NAME, ...]}
                                       argv: ``python -m workers``'s flags; env: what the
                                       worker's environment adds; the file descriptors ride
                                       along (SCM_RIGHTS), one per name in fd_env, and the
                                       worker finds each in that variable
    zygote -> broker:
        {"fork": N, "pid": PID}        the worker's pid, once it is the broker's child
        {"fork": N, "error": TEXT}     no worker was forked

A message that is not such a map is an error for its reader, which closes the channel.
"""

from __future__ import annotations

import socket
from typing import Any, Sequence

import msgpack

ZYGOTE_FD_ENV = "TFBROKER_ZYGOTE_FD"
MAX_MESSAGE_BYTES = 1 << 20
MAX_FDS = 8


class ChannelError(Exception):
    """The other end sent something unreadable, or is gone."""


def channel() -> tuple[socket.socket, socket.socket]:
    """The broker's end and the zygote's end (inheritable, to pass to it)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    theirs.set_inheritable(True)
    return ours, theirs


def send(sock: socket.socket, message: dict[str, Any], fds: Sequence[int] = ()) -> None:
    try:
        socket.send_fds(sock, [msgpack.packb(message)], list(fds))
    except OSError as exc:
        raise ChannelError(f"cannot send: {exc.strerror or exc}") from None


def receive(sock: socket.socket) -> tuple[dict[str, Any], list[int]]:
    """One message and the file descriptors that came with it (the receiver's to close)."""
    try:
        data, fds, _flags, _address = socket.recv_fds(sock, MAX_MESSAGE_BYTES, MAX_FDS)
    except OSError as exc:
        raise ChannelError(f"cannot receive: {exc.strerror or exc}") from None
    if not data:
        raise ChannelError("the channel is closed")
    try:
        message = msgpack.unpackb(data)
    except (ValueError, msgpack.ExtraData) as exc:
        message = exc
    if not isinstance(message, dict):
        for fd in fds:
            socket.close(fd)
        raise ChannelError(f"not a message: {message!r:.200}")
    return message, list(fds)
