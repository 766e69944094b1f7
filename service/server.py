"""The HTTP connection layer under the app: uvicorn's h11 protocol with a header deadline and a connection cap.

uvicorn has a keep-alive timeout but no deadline for a request's headers (a client may send one header line a
second for as long as it likes) and its concurrency limit counts tasks as well as connections. Here, per
connection:
- the headers of each request must be complete within `header_timeout_s` of the connection opening or of the
  previous response ending, or the client gets 408 and the connection is closed;
- a connection beyond `max_connections` open ones gets 503 at once and is closed.
The body's deadline is the app's (service/app.py, `Instrument`), which answers 408 through the normal error path.
"""
from __future__ import annotations

import json
import logging

from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("astguard.service")


def _raw_response(status: int, phrase: str, message: str, reason: str) -> bytes:
    body = json.dumps({"detail": message, "reason": reason}).encode()
    head = (f"HTTP/1.1 {status} {phrase}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            "connection: close\r\n\r\n").encode()
    return head + body


def guarded_protocol(header_timeout_s: float, max_connections: int, on_refusal=None) -> type[H11Protocol]:
    """An H11Protocol subclass bound to these limits; `on_refusal(reason)` counts each refusal (the metrics)."""

    class Guarded(H11Protocol):
        _header_timer = None
        _cycle_seen = None
        _over = False

        def connection_made(self, transport):
            super().connection_made(transport)
            # Over the cap: answered 503 on the request's first bytes (answering before them would race the
            # client's send, and its reset could discard the answer), or closed at the header deadline.
            self._over = len(self.connections) > max_connections
            self._arm()

        def data_received(self, data):
            if self._over:
                self._refuse(503, "Service Unavailable", f"over the limit of {max_connections} open connections; "
                                                         "retry later", "too_many_connections")
                return
            super().data_received(data)

        def _arm(self):
            self._disarm()
            self._header_timer = self.loop.call_later(header_timeout_s, self._header_timeout)

        def _disarm(self):
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _refuse(self, status, phrase, message, reason):
            if on_refusal is not None:
                on_refusal(reason)
            log.warning(json.dumps({"event": reason, "client": "%s:%d" % self.client if self.client else None}))
            if not self.transport.is_closing():
                self.transport.write(_raw_response(status, phrase, message, reason))
                self.transport.close()

        def _header_timeout(self):
            self._header_timer = None
            if self.cycle is None or self.cycle.response_complete:  # still waiting for a request's headers
                self._refuse(408, "Request Timeout", f"request headers not complete within {header_timeout_s:g} s",
                             "header_timeout")

        def handle_events(self):
            super().handle_events()
            if self.cycle is not None and self.cycle is not self._cycle_seen:  # a request's headers arrived
                self._cycle_seen = self.cycle
                self._disarm()

        def on_response_complete(self):
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()

        def connection_lost(self, exc):
            self._disarm()
            super().connection_lost(exc)

    return Guarded
