"""How `serve` runs the app: uvicorn, with a deadline on request headers and a cap on connections.

uvicorn times out idle keep-alive connections but not a connection that is still sending its headers: a
client that opens hundreds of connections and sends a few bytes on each ("slowloris") holds every one of
them open for ever. uvicorn has no setting for it, but it takes the HTTP protocol class as a parameter
(`http=`), so `HeaderDeadlineProtocol` is its own h11 protocol plus one timer: armed when a connection
opens or starts a new request, cancelled once h11 has parsed a whole request head, and closing the
connection when it fires. (A server with such a setting built in, granian or hypercorn, would mean
another server to deploy and measure for a dozen lines here.)
"""

from __future__ import annotations

import asyncio
import resource
import socket

import h11
import structlog
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

log = structlog.get_logger("worker.http")

# A real client sends its whole request head in one packet, well within a second even over a slow
# mobile link; 5 s leaves room for that and still frees a stalled connection quickly.
HEADER_TIMEOUT_S = 5.0
# One process answers ~300 lookups/s at ~50 ms each, so a few dozen connections are busy at once. Past
# this many open connections uvicorn answers new requests 503 instead of taking on more work. uvicorn counts
# every open connection, stalled ones too, so the cap sits well above what the header deadline lets a
# slow client hold (800 stalled connections still leave lookups answering); a flood beyond it is for the
# load balancer in front.
MAX_CONNECTIONS = 2048
# Descriptors besides connections: the listening socket, database connections, log files, imports.
SPARE_DESCRIPTORS = 64


class HeaderDeadlineProtocol(H11Protocol):
    """uvicorn's h11 protocol that closes a connection whose request head is not complete in time."""

    header_timeout = HEADER_TIMEOUT_S

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._header_deadline: asyncio.TimerHandle | None = None
        super().connection_made(transport)
        self._arm_header_deadline()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is h11.IDLE:
            # Still waiting for a request head: the first bytes of a new request on a kept-alive connection
            # cancel uvicorn's idle timer, so the deadline must cover them.
            self._arm_header_deadline()
        else:
            self._cancel_header_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_deadline()
        super().connection_lost(exc)

    def _arm_header_deadline(self) -> None:
        if self._header_deadline is None:
            self._header_deadline = self.loop.call_later(self.header_timeout, self._header_deadline_passed)

    def _cancel_header_deadline(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _header_deadline_passed(self) -> None:
        self._header_deadline = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            log.info("http.header_timeout", client=self.client[0] if self.client else None,
                     timeout_s=self.header_timeout)
            self.transport.close()


def raise_descriptor_limit(wanted: int = MAX_CONNECTIONS + SPARE_DESCRIPTORS) -> int:
    """Lift the soft open-file limit towards `wanted` (up to the hard limit): the common default of 1,024
    would make accept() fail before the connection cap is reached. Returns the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    if soft != resource.RLIM_INFINITY and soft < wanted:
        log.warning("serve.descriptor_limit", limit=soft, wanted=wanted,
                    hint="raise LimitNOFILE / ulimit -n: past it accept() fails and new connections wait unanswered")
    return soft


def run(app, *, host: str, port: int, listener: socket.socket) -> None:
    """Serve `app` on the already bound `listener` until SIGTERM/SIGINT. Our own access log line
    (worker.http) replaces uvicorn's; logging stays as the CLI configured it."""
    raise_descriptor_limit()
    config = uvicorn.Config(app, host=host, port=port, http=HeaderDeadlineProtocol, limit_concurrency=MAX_CONNECTIONS,
                            access_log=False, log_config=None, server_header=False)
    uvicorn.Server(config).run(sockets=[listener])
