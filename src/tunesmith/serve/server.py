"""The uvicorn server that `tunesmith deploy` runs serve/app.py's app in.

Two things plain uvicorn does not do:
  * a connection whose request head (request line + headers) has not fully arrived HEAD_TIMEOUT seconds after it
    began is closed (slow loris: a trickle of header bytes would otherwise hold the connection for ever; a
    half-sent body is timed out by the app, app.BODY_TIMEOUT);
  * on shutdown (SIGINT/SIGTERM) the app's open requests are ended first (`before_shutdown`: streams get an error
    event and `data: [DONE]`, others a 503), so uvicorn's graceful wait ends at once instead of cutting streams
    when --timeout_graceful_shutdown runs out.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Callable

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("tunesmith.serve")


class HeadTimeoutProtocol(H11Protocol):
    """uvicorn's h11 protocol, closing connections whose request head takes longer than `head_timeout` seconds."""

    head_timeout = 10.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_timer: asyncio.TimerHandle | None = None
        self._arm_head_timer()

    def _arm_head_timer(self) -> None:
        self._head_timer = self.loop.call_later(self.head_timeout, self._head_timed_out, self.cycle)

    def data_received(self, data: bytes) -> None:
        if self._head_timer is None and self.conn.their_state is h11.IDLE:  # a new request's head begins
            self._arm_head_timer()
        super().data_received(data)

    def _head_timed_out(self, cycle) -> None:
        self._head_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return  # closed, or a request's head has arrived (its body has the app's own timeout)
        if self.cycle is not cycle:  # heads completed since: watch the one (if any) now arriving
            self._arm_head_timer()
            return
        log.warning("closed a connection whose request head did not arrive within %.0f s", self.head_timeout)
        self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        super().connection_lost(exc)


class Server(uvicorn.Server):
    """uvicorn.Server that calls `before_shutdown` (end the app's open requests) before its graceful shutdown."""

    def __init__(self, config: uvicorn.Config, before_shutdown: Callable[[], None] = lambda: None):
        super().__init__(config)
        self.before_shutdown = before_shutdown

    async def shutdown(self, sockets=None) -> None:
        try:
            self.before_shutdown()
        except Exception:  # noqa: BLE001 — the shutdown itself must go on
            log.exception("ending open requests at shutdown failed")
        await super().shutdown(sockets)


def server_config(app, log_level: str = "info", timeout_graceful_shutdown: int = 5, **kw) -> uvicorn.Config:
    """uvicorn's settings for the app: the head timeout above, idle keep-alive connections closed after 5 s."""
    return uvicorn.Config(app, http=HeadTimeoutProtocol, log_level=log_level, timeout_keep_alive=5,
                          timeout_graceful_shutdown=timeout_graceful_shutdown, **kw)
