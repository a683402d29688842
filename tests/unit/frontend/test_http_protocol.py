"""The frontends' HTTP protocol sends a response's head and body in one write."""

from __future__ import annotations

import asyncio
from typing import Any

from frontend.http_protocol import HeldHead
from tfbroker.runtime.settings import RequestLimits

DATE = (b"date", b"Mon, 07 Dec 2026 10:00:00 GMT")
HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n"


class Transport:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: Any) -> None:
        assert not self.closed, "written after close"
        self.writes.append(bytes(data))

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str) -> str:
        return f"info:{name}"


def test_a_head_and_its_body_leave_in_one_write() -> None:
    async def main() -> list[bytes]:
        transport = Transport()
        held = HeldHead(transport, asyncio.get_running_loop())  # type: ignore[arg-type]
        held.write(HEAD)
        assert transport.writes == []
        held.write(memoryview(b"{}"))
        await asyncio.sleep(0)
        return transport.writes

    assert asyncio.run(main()) == [HEAD + b"{}"]


def test_a_head_without_a_body_this_turn_still_leaves_this_turn() -> None:
    async def main() -> list[bytes]:
        transport = Transport()
        held = HeldHead(transport, asyncio.get_running_loop())  # type: ignore[arg-type]
        held.write(HEAD)  # a HEAD request's answer, or a stream's first chunk still to come
        await asyncio.sleep(0)
        assert transport.writes == [HEAD]
        held.write(b"chunk")
        return transport.writes

    assert asyncio.run(main()) == [HEAD, b"chunk"]


def test_the_interim_100_continue_and_bodies_are_never_held() -> None:
    async def main() -> list[bytes]:
        transport = Transport()
        held = HeldHead(transport, asyncio.get_running_loop())  # type: ignore[arg-type]
        held.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        held.write(b"more of a body")
        return transport.writes

    assert asyncio.run(main()) == [b"HTTP/1.1 100 Continue\r\n\r\n", b"more of a body"]


def test_a_held_head_is_sent_before_the_connection_closes() -> None:
    async def main() -> Transport:
        transport = Transport()
        held = HeldHead(transport, asyncio.get_running_loop())  # type: ignore[arg-type]
        held.write(HEAD)
        held.close()
        assert held.get_extra_info("peername") == "info:peername"  # the rest is the transport's
        return transport

    transport = asyncio.run(main())
    assert transport.writes == [HEAD] and transport.closed


# --- DirectPredictProtocol: plain predict requests answered below ASGI ---

class App:
    """An app with the direct predict interface (as frontend.app.RestApi) that records how
    each request reached it; its predictions wait on ``release``."""

    def __init__(self) -> None:
        self.limits = RequestLimits(max_request_body_bytes=1000)
        self.direct: list[bytes] = []
        self.asgi: list[str] = []
        self.cancelled: list[bytes] = []
        self.release = asyncio.Event()

    def direct_predict_call(self, path: str) -> str | None:
        return path if path.endswith(":predict") else None

    async def direct_predict(self, call: str, headers: list[tuple[bytes, bytes]], body: bytes) -> Any:
        self.direct.append(body)
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled.append(body)
            raise
        return 200, b'{"predictions": ' + body + b"}", [(b"x-model-version", b"1")]

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        self.asgi.append(scope["path"])
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"4")]})
        await send({"type": "http.response.body", "body": b"asgi"})


class Socket(Transport):
    def get_extra_info(self, name: str) -> Any:
        return {"peername": ("127.0.0.1", 5000), "sockname": ("127.0.0.1", 8501)}.get(name)

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def set_write_buffer_limits(self, *args: Any) -> None:
        pass


def post(path: str, body: bytes, *extra: bytes) -> bytes:
    return (b"POST " + path.encode() + b" HTTP/1.1\r\nHost: x\r\n" + b"".join(extra)
            + b"Content-Length: %d\r\n\r\n" % len(body) + body)


async def connect(app: App) -> tuple[Any, Socket]:
    from uvicorn.config import Config
    from uvicorn.server import ServerState

    from frontend.http_protocol import DirectPredictProtocol

    config = Config(app=app, access_log=False, log_config=None, proxy_headers=False)
    config.load()
    state = ServerState()
    state.default_headers = [DATE]  # as uvicorn's Server keeps it, each second
    protocol = DirectPredictProtocol(config, state, {})
    socket = Socket()
    protocol.connection_made(socket)  # type: ignore[arg-type]
    return protocol, socket


async def turns(count: int = 5) -> None:
    for _ in range(count):
        await asyncio.sleep(0)


def test_a_plain_predict_is_answered_directly_in_one_write() -> None:
    async def main() -> tuple[App, Socket]:
        app = App()
        protocol, socket = await connect(app)
        protocol.data_received(post("/v1/models/m:predict", b"[1]"))
        await turns()
        app.release.set()
        await turns()
        return app, socket

    app, socket = asyncio.run(main())
    assert app.direct == [b"[1]"] and app.asgi == []
    assert socket.writes == [b"HTTP/1.1 200 OK\r\ndate: Mon, 07 Dec 2026 10:00:00 GMT\r\n"
                             b"content-type: application/json\r\ncontent-length: 20\r\n"
                             b"x-model-version: 1\r\n\r\n" b'{"predictions": [1]}']
    assert not socket.closed


def test_a_direct_answer_has_the_headers_of_an_asgi_answer() -> None:
    async def main() -> tuple[bytes, bytes]:
        app = App()
        app.release.set()
        protocol, socket = await connect(app)
        protocol.data_received(post("/v1/models/m:predict", b"[1]"))
        await turns()
        protocol.data_received(post("/v1/models/m", b"{}"))  # through ASGI
        await turns()
        return socket.writes[0], socket.writes[1]

    direct, asgi = asyncio.run(main())
    names = [{line.split(b":")[0].lower() for line in answer.split(b"\r\n\r\n")[0].split(b"\r\n")[1:]}
             for answer in (direct, asgi)]
    assert b"date" in names[1] and names[1] <= names[0], names


def test_a_uvicorn_without_what_the_direct_path_needs_falls_back_to_asgi(monkeypatch: Any, caplog: Any) -> None:
    from frontend import http_protocol

    monkeypatch.setattr(http_protocol.DirectPredictProtocol, "checked", False)
    monkeypatch.setattr(http_protocol.DirectPredictProtocol, "checked_request", False)
    monkeypatch.setattr(http_protocol, "unavailable", "")
    monkeypatch.setattr(http_protocol, "INSTANCE_ATTRIBUTES", (*http_protocol.INSTANCE_ATTRIBUTES, "renamed_in_uvicorn_1"))

    async def main() -> App:
        app = App()
        app.release.set()
        protocol, socket = await connect(app)
        protocol.data_received(post("/v1/models/m:predict", b"[1]"))
        await turns()
        assert socket.writes and socket.writes[0].endswith(b"asgi")
        return app

    app = asyncio.run(main())
    assert app.direct == [] and app.asgi == ["/v1/models/m:predict"]
    assert "renamed_in_uvicorn_1" in caplog.text and http_protocol.frontend_protocol() is None


def test_other_requests_go_through_asgi() -> None:
    async def main() -> App:
        app = App()
        app.release.set()
        protocol, socket = await connect(app)
        protocol.data_received(post("/v1/models/m", b"{}"))  # not predict
        await turns()
        protocol.data_received(post("/v1/models/m:predict", b"[2]", b"Expect: 100-continue\r\n"))
        await turns()
        protocol.data_received(post("/v1/models/m:predict", b"x" * 1001))  # beyond the body limit: 413 there
        await turns()
        chunked = b"POST /v1/models/m:predict HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\n[3]\r\n0\r\n\r\n"
        protocol.data_received(chunked)
        await turns()
        protocol.data_received(b"POST /v1/models/m:predict HTTP/1.0\r\nContent-Length: 3\r\n\r\n[4]")
        await turns()
        return app

    app = asyncio.run(main())
    assert app.direct == []
    assert app.asgi == ["/v1/models/m"] + ["/v1/models/m:predict"] * 4


def test_a_request_pipelined_behind_a_direct_answer_waits_its_turn() -> None:
    async def main() -> tuple[App, Socket]:
        app = App()
        protocol, socket = await connect(app)
        protocol.data_received(post("/v1/models/m:predict", b"[1]") + post("/v1/models/m:predict", b"[2]"))
        await turns()
        assert app.direct == [b"[1]"] and app.asgi == [] and socket.writes == []
        app.release.set()
        await turns(10)
        return app, socket

    app, socket = asyncio.run(main())
    assert app.asgi == ["/v1/models/m:predict"]  # the second, after the first was answered
    assert b"".join(socket.writes).index(b'{"predictions": [1]}') < b"".join(socket.writes).index(b"asgi")


def test_a_client_that_goes_away_cancels_its_direct_request() -> None:
    async def main() -> App:
        app = App()
        protocol, socket = await connect(app)
        protocol.data_received(post("/v1/models/m:predict", b"[5]"))
        await turns()
        protocol.connection_lost(None)
        await turns()
        assert socket.writes == []
        return app

    assert asyncio.run(main()).cancelled == [b"[5]"]


def test_a_shutdown_lets_the_direct_answer_finish_then_closes() -> None:
    async def main() -> Socket:
        app = App()
        protocol, socket = await connect(app)
        protocol.data_received(post("/v1/models/m:predict", b"[6]"))
        await turns()
        protocol.shutdown()
        assert not socket.closed
        app.release.set()
        await turns()
        return socket

    socket = asyncio.run(main())
    assert len(socket.writes) == 1 and b"connection: close\r\n" in socket.writes[0] and socket.closed


def test_a_direct_predict_that_fails_answers_500_and_closes() -> None:
    class Failing(App):
        async def direct_predict(self, call: str, headers: list[tuple[bytes, bytes]], body: bytes) -> Any:
            raise RuntimeError("a bug")

    async def main() -> Socket:
        protocol, socket = await connect(Failing())
        protocol.data_received(post("/v1/models/m:predict", b"[7]"))
        await turns()
        return socket

    socket = asyncio.run(main())
    assert len(socket.writes) == 1 and socket.writes[0].startswith(b"HTTP/1.1 500 ")
    assert b"connection: close\r\n" in socket.writes[0] and b"RuntimeError: a bug" in socket.writes[0]
    assert socket.closed


def test_a_direct_answer_may_name_its_own_content_type() -> None:
    """The Open Inference Protocol's binary answers (application/octet-stream) go the direct way too."""
    class Binary(App):
        def direct_predict_call(self, path: str) -> str | None:
            return path if path.endswith("/infer") else None

        async def direct_predict(self, call: str, headers: list[tuple[bytes, bytes]], body: bytes) -> Any:
            return 200, b"{}\x00\x01", [(b"content-type", b"application/octet-stream"),
                                        (b"inference-header-content-length", b"2")]

    async def main() -> Socket:
        protocol, socket = await connect(Binary())
        protocol.data_received(post("/v2/models/m/infer", b"{}"))
        await turns()
        return socket

    (answer,) = asyncio.run(main()).writes
    head = answer.split(b"\r\n\r\n")[0].lower()
    assert b"content-type: application/octet-stream" in head and b"application/json" not in head
    assert answer.endswith(b"\r\n\r\n{}\x00\x01")
