"""The broker's HTTP server: uvicorn with connection caps and a deadline for every request.

uvicorn times out idle keep-alive connections but not a client that connects and then sends its request a byte at
a time (or never), and it accepts as many connections as the process has file descriptors. A handful of such
clients would hold every descriptor the broker has. The protocol here counts open connections per client address
(closing those past the cap at once) and gives every request ``request_timeout_s`` from its first byte (or from the
connection) to its last, then closes the connection.
"""

from __future__ import annotations

import asyncio
import resource
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from confnb.broker.limits import BrokerLimits, client_key

_RECEIVING = (h11.IDLE, h11.SEND_BODY)
_RESERVED_DESCRIPTORS = 64


def guarded_protocol(limits: BrokerLimits) -> type[H11Protocol]:
    """An h11 protocol class enforcing ``limits``; one class per server, since it holds the per-address counts."""
    open_by_client: dict[str, int] = {}
    most = _connection_cap(limits.max_connections)

    class GuardedH11Protocol(H11Protocol):
        _guard_key: str | None = None
        _request_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)  # type: ignore[arg-type]
            key = client_key(self.client[0]) if self.client else "unknown"
            if open_by_client.get(key, 0) >= limits.max_connections_per_client or len(self.connections) > most:
                self.transport.close()
                return
            self._guard_key = key
            open_by_client[key] = open_by_client.get(key, 0) + 1
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            if self._guard_key is not None:
                left = open_by_client[self._guard_key] - 1
                if left:
                    open_by_client[self._guard_key] = left
                else:
                    del open_by_client[self._guard_key]
                self._guard_key = None
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self._guard_key is None:
                return  # refused in connection_made; the transport is closing
            super().data_received(data)
            if not self.transport.is_closing() and self.conn.their_state in _RECEIVING:
                self._arm()  # a request is on its way: its clock keeps running, new bytes do not reset it
            else:
                self._disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if self.conn.their_state is h11.DONE:
                self._disarm()

        def _arm(self) -> None:
            if self._request_timer is None:
                self._request_timer = self.loop.call_later(limits.request_timeout_s, self._timed_out)

        def _disarm(self) -> None:
            if self._request_timer is not None:
                self._request_timer.cancel()
                self._request_timer = None

        def _timed_out(self) -> None:
            self._request_timer = None
            if self.conn.their_state in _RECEIVING and not self.transport.is_closing():
                self.transport.close()

    return GuardedH11Protocol


def _connection_cap(wanted: int) -> int:
    """``wanted``, or fewer if the process may not open that many files: past the descriptor limit the accept loop
    fails instead of refusing, and SQLite and the audit log need descriptors of their own."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return wanted
    return max(1, min(wanted, soft - _RESERVED_DESCRIPTORS))


def uvicorn_config(app: Any, limits: BrokerLimits, host: str, port: int, **options: Any) -> uvicorn.Config:
    """uvicorn's configuration for the broker; ``options`` go to uvicorn (TLS files, log level)."""
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        http=guarded_protocol(limits),
        ws="none",
        lifespan="on",
        # The audit log's actor is the TCP peer. uvicorn's default believes X-Forwarded-For from 127.0.0.1, i.e.
        # from every client of a broker on loopback, which could then write any actor into the log.
        proxy_headers=False,
        timeout_keep_alive=5,
        **options,
    )
