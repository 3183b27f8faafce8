"""uvicorn's HTTP/1.1 protocol (h11) with a deadline for the request head.

uvicorn times out idle keep-alive connections but not a client that opens a connection and sends its request
line and headers a byte at a time (slowloris): such a connection would be held for ever. Here every request head
has ``header_timeout_s`` to arrive whole, counted from the connection (or the previous response); a client that
misses it is answered ``408 Request Timeout`` and disconnected, with one info line in the log. The body has its
own bounds (``RequestBodyLimits``).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger(__name__)
_TIMEOUT_BODY = b"request head not received in time (header_timeout_s)\n"
_TIMEOUT_ANSWER = (b"HTTP/1.1 408 Request Timeout\r\nContent-Type: text/plain; charset=utf-8\r\nConnection: close\r\n"
                   b"Content-Length: %d\r\n\r\n%s" % (len(_TIMEOUT_BODY), _TIMEOUT_BODY))


def with_header_timeout(header_timeout_s: float) -> type[H11Protocol]:
    """An ``H11Protocol`` class (for ``uvicorn.run(http=...)``) that enforces ``header_timeout_s``."""

    class HeaderTimeoutProtocol(H11Protocol):
        _head_deadline: asyncio.TimerHandle | None = None
        _head_for: Any = None  # the request cycle that was current when the deadline was set

        def _arm(self) -> None:
            self._disarm()
            self._head_for = self.cycle
            self._head_deadline = self.loop.call_later(header_timeout_s, self._head_too_slow)

        def _disarm(self) -> None:
            if self._head_deadline is not None:
                self._head_deadline.cancel()
                self._head_deadline = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def handle_events(self) -> None:
            super().handle_events()
            if self._head_deadline is not None and self.cycle is not self._head_for:
                self._disarm()  # a new request's head arrived whole

        def on_response_complete(self) -> None:
            self._arm()  # first: the next request may be pipelined, and handled (and disarmed) by super()
            super().on_response_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _head_too_slow(self) -> None:
            self._head_deadline = None
            if self.transport.is_closing():
                return
            log.info("a request head was not complete after %g s (header_timeout_s): connection closed",
                     header_timeout_s)
            self.transport.write(_TIMEOUT_ANSWER)
            self.transport.close()

    return HeaderTimeoutProtocol
