"""A real HTTP endpoint on loopback that records what is POSTed to it: a webhook receiver, or a stand-in
for Alertmanager's API."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest


class Receiver:
    """A real HTTP endpoint on 127.0.0.1: records every POST and answers `ok` (200), `fail` (500),
    `refuse` (400), `hang` (reads the request, then never answers until the test ends) or `echo` (500 with
    `echo(headers)` as its body, the request line first as `Request`, as a debugging receiver or a proxy that
    reflects the request does)."""

    def __init__(self) -> None:
        self.posts: list[dict] = []
        self.behaviour = "ok"
        self.echo = lambda headers: "".join(f"{name}: {value}\n" for name, value in headers.items())
        self.arrived = threading.Event()
        self._release = threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.posts.append({"path": self.path, "content_type": self.headers["Content-Type"],
                                       "at": time.monotonic(), "json": json.loads(body)})
                receiver.arrived.set()
                if receiver.behaviour == "hang":
                    receiver._release.wait(30)
                    return
                if receiver.behaviour == "echo":
                    answer = receiver.echo({"Request": f"POST {self.path}", **dict(self.headers.items())}).encode()
                    self.send_response(500)
                    self.send_header("Content-Type", "text/plain")
                    self.send_header("Content-Length", str(len(answer)))
                    self.end_headers()
                    self.wfile.write(answer)
                    return
                self.send_response({"ok": 200, "fail": 500, "refuse": 400}[receiver.behaviour])
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *_args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.url = f"{self.base}/hooks/alertmanager?token=s3cret"
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    def payloads(self) -> list[dict]:
        return [post["json"] for post in self.posts]

    def close(self) -> None:
        self._release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    """An Alertmanager-style webhook receiver started for this test."""
    server = Receiver()
    yield server
    server.close()
