"""``python -m bench.otlp_sink PORT``: an OTLP/HTTP receiver that accepts every export and
keeps nothing, so that ``bench.ab --variant traced=--otel_traces_endpoint=…`` measures what
tracing costs tfbroker, not a collector's back-pressure. Prints the exports it took at exit."""

from __future__ import annotations

import signal
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

received = {"exports": 0, "bytes": 0}


class Sink(BaseHTTPRequestHandler):
    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        received["exports"] += 1
        received["bytes"] += len(body)
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def main() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Sink)
    # serve_forever returns once shutdown is called, from another thread than its own.
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    server.serve_forever()
    print(received, flush=True)


if __name__ == "__main__":
    main()
