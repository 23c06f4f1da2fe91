"""A real `media-retention serve` process on a free port, for the tests and the benchmark that speak HTTP to it."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests

from tests.conftest import free_port

SCRIPT = Path(sys.executable).with_name("media-retention")


@dataclass
class Server:
    """A running `media-retention serve` and what it logged."""

    url: str
    process: subprocess.Popen
    log_lines: list[str] = field(default_factory=list)
    reader: threading.Thread | None = None

    def get(self, path: str, token: str | None = None, **headers) -> requests.Response:
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        return requests.get(self.url + path, headers=headers, timeout=10)

    @property
    def log(self) -> str:
        return "\n".join(self.log_lines)


def start_server(env: dict[str, str], tmp_path: Path) -> Server:
    port = free_port()
    environment = {name: value for name, value in os.environ.items() if not name.startswith("MEDIA_RETENTION_")}
    environment.update({"MEDIA_RETENTION_DATA_DIR": str(tmp_path / "data"), "MEDIA_RETENTION_LOG_FORMAT": "json", **env})
    process = subprocess.Popen([str(SCRIPT), "serve", "--port", str(port)], env=environment, stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    server = Server(f"http://127.0.0.1:{port}", process)
    server.reader = threading.Thread(target=lambda: server.log_lines.extend(iter(process.stdout.readline, "")), daemon=True)
    server.reader.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"serve exited with {process.returncode}:\n{server.log}")
        try:
            if requests.get(server.url + "/healthz", timeout=1).status_code == 200:
                return server
        except requests.ConnectionError:
            time.sleep(0.1)
    stop_server(server)
    raise AssertionError(f"serve did not answer /healthz within 30 s:\n{server.log}")


def stop_server(server: Server) -> None:
    server.process.terminate()
    try:
        server.process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait()
    server.reader.join(timeout=10)
    server.process.stdout.close()
