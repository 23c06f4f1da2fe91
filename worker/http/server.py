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
# One process answers ~2,000 lookups/s at a few ms each, so a few dozen connections are busy at once. Past
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
        _no_delay(transport)
        super().connection_made(_CoalescedWrites(transport, asyncio.get_running_loop()))
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


class _CoalescedWrites:
    """The connection's transport as uvicorn's protocol sees it, with the writes of one turn of the event loop sent
    together. uvicorn writes a response's head and its body separately, and with TCP_NODELAY each write is a
    segment of its own: two sends, two wake-ups of the client, a tenth of a lookup's CPU. Held only until the loop
    comes round (the same turn's body joins its head), flushed before the connection closes; everything else is
    the transport's own."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop):
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] = []

    def write(self, data: bytes) -> None:
        if not data:
            return
        if not self._pending:
            self._loop.call_soon(self._flush)
        self._pending.append(data)

    def _flush(self) -> None:
        if self._pending:
            data = b"".join(self._pending)
            self._pending.clear()
            if not self._transport.is_closing():
                self._transport.write(data)

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def __getattr__(self, name: str):
        return getattr(self._transport, name)


def _no_delay(transport: asyncio.Transport) -> None:
    """Send each response as soon as it is written (TCP_NODELAY). asyncio sets it on the connections of a server
    it bound itself, but not on those of a listener handed in whose protocol number is 0, as
    `socket.create_server` makes them (serve binds its own, to say a busy port in one sentence): Nagle's
    algorithm then held a response's body until the client acknowledged its head, which a client delays by up
    to 40 ms. That stall, not the work, was most of a lookup's time (about 300 lookups/s at p50 48 ms)."""
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


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
