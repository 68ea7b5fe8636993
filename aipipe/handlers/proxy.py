"""Provider passthrough: /<provider>/<path> with the user's token swapped for the operator's key.

JSON answers are held whole (to read their usage) and then sent; server-sent events are relayed
as they arrive, with a slow reader slowing the upstream read instead of growing memory.
"""
from __future__ import annotations

import logging
import time

import orjson
from tornado.httpclient import HTTPClientError, HTTPRequest
from tornado.httputil import HTTPHeaders
from tornado.iostream import StreamClosedError

from ..errors import ApiError
from ..gateway import Outcome
from ..providers import PROVIDERS
from ..providers.base import Call, streamed_estimate
from ..sse import Event, SSEParser
from ..usage import read_usage
from .base import ApiHandler

log = logging.getLogger("aipipe.proxy")

DROP_RESPONSE_HEADERS = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer", "trailers",
    "transfer-encoding", "upgrade", "content-length", "content-encoding", "set-cookie",
    "openai-organization", "openai-project", "x-consumed-content-encoding",
})
KEY_REJECTED = "provider credentials misconfigured"


def is_closed_connection(error) -> bool:
    """The connection closed under a request (rather than refused, timed out or answered)."""
    return isinstance(error, StreamClosedError) or (
        isinstance(error, HTTPClientError) and error.code == 599 and "closed" in str(error).lower())


def usage_only(event: Event) -> bool:
    """The chunk OpenAI adds for include_usage: usage and an empty choices list."""
    if b'"choices"' not in event.data or b'"usage"' not in event.data or b'"usage":null' in event.data:
        return False
    try:
        obj = orjson.loads(event.data)
    except orjson.JSONDecodeError:
        return False
    return isinstance(obj, dict) and obj.get("choices") == [] and isinstance(obj.get("usage"), dict)


class ProviderHandler(ApiHandler):
    """Relays one call to a provider and bills its usage."""

    async def prepare(self) -> None:
        self.provider = PROVIDERS.get(self.path_args[0])
        # the route (/geminiv1beta) may differ from the provider's config, key and ledger name (gemini)
        self.provider_name = self.provider.name if self.provider else self.path_args[0]
        if self.provider is None and self.request.method != "OPTIONS":
            raise ApiError(404, f"Unknown provider: {self.provider_name}")

    async def get(self, name: str, path: str) -> None:
        await self.relay("/" + path)

    post = put = patch = delete = head = get

    async def relay(self, path: str) -> None:
        """Authenticate, price, admit, forward, relay and settle one call."""
        self.started = time.perf_counter()
        identity = self.gw.identify(self.request.headers)
        req = self.request
        call = Call(method=req.method, path=path, query=req.query, headers=req.headers, body=req.body)
        await self.provider.prepare(call, self.gw)
        key = identity.native_key or self.gw.provider_key(self.provider_name)
        admission = None if identity.is_native else await self.gw.admit(identity.email, call.hold)
        self.call, self.outcome, self.native = call, Outcome(), identity.is_native
        try:
            await self._forward(key)
        finally:
            self.outcome.cost = self._cost()
            if admission is not None:
                elapsed = (time.perf_counter() - self.started) * 1000
                self.gw.settle(identity.email, admission, self.provider_name, call, self.outcome, elapsed)

    def _cost(self) -> float:
        call, out = self.call, self.outcome
        if not call.billable or not 200 <= out.status < 300:
            return 0.0
        if out.usage is not None:
            return self.provider.cost(call, out.usage)
        return streamed_estimate(call, out.output_bytes)

    async def _forward(self, key: str) -> None:
        call = self.call
        self._lines: list[str] = []
        self._mode = ""  # "sse" | "json" | "raw" | "reject", decided from the upstream's Content-Type
        self._json = bytearray()
        self._sse = SSEParser()
        self._client_gone = False
        request = HTTPRequest(
            self.provider.target_url(self.gw.config.providers[self.provider_name].base_url, call),
            method=call.method, headers=self.provider.forward_headers(call, key),
            body=call.body if call.method in ("POST", "PUT", "PATCH") or call.body else None,
            header_callback=self._on_header_line, streaming_callback=self._on_chunk,
            follow_redirects=False, allow_nonstandard_methods=True, decompress_response=True,
            connect_timeout=min(30.0, self.gw.config.get("limits.upstream_timeout")),
            request_timeout=self.gw.config.get("limits.upstream_timeout"))
        self._sent_at = time.perf_counter()
        for attempt in (1, 2):
            try:
                response = await self.gw.http.fetch(request, raise_error=False)
                error = response.error if response.code == 599 else None
            except (OSError, HTTPClientError, StreamClosedError) as e:  # raise_error=False still raises these
                error = e
            # A reused connection the provider closed just then fails before any answer: try once more.
            if not (attempt == 1 and not self._mode and self._lines == [] and is_closed_connection(error)):
                break
        if error is not None and not self._mode:
            raise self._connection_error(error)
        if error is not None:
            log.warning("upstream %s broke off mid-answer: %s", self.provider_name, error)
        await self._finish_answer()

    def _connection_error(self, error) -> ApiError:
        text = str(error) if error else "no answer"
        if isinstance(error, HTTPClientError) and "timeout" in text.lower():
            return ApiError(504, f"{self.provider_name} did not answer in time")
        return ApiError(502, f"Could not reach {self.provider_name}: {text}")

    def _on_header_line(self, line: str) -> None:
        if line != "\r\n":
            self._lines.append(line)
            return
        start_line = self._lines[0].strip().split(" ", 2)
        status, reason = int(start_line[1]), (start_line[2] if len(start_line) > 2 else None)
        headers = HTTPHeaders.parse("".join(self._lines[1:]))
        self._lines = []
        if 100 <= status < 200:
            return
        self.outcome.status = status
        if status in (401, 403) and not self.native:
            self._mode = "reject"
            self._log_key_rejected()
            return
        ctype = headers.get("Content-Type", "").lower()
        self._mode = "sse" if "text/event-stream" in ctype else "json" if "json" in ctype else "raw"
        self._received_at = time.perf_counter()
        self.set_status(status, reason or None)
        self.copy_upstream_headers(headers, DROP_RESPONSE_HEADERS)
        if self._mode != "json":
            self.outcome.streamed = self._mode == "sse"
            self._set_overhead()
            # headers now, so clients see the stream open before the first event; and no Nagle delay
            # between small events (Tornado turns it off only when a response finishes)
            if self._mode == "sse":
                self.request.connection.stream.set_nodelay(True)
            self.flush().add_done_callback(lambda f: f.exception())

    def _log_key_rejected(self) -> None:
        log.error("%s answered %d to the operator's key: check %s", self.provider_name, self.outcome.status,
                  self.provider_name.upper() + "_API_KEY")

    def _set_overhead(self) -> None:
        added = (self._sent_at - self.started) + (time.perf_counter() - self._received_at)
        self.set_header("X-AIPipe-Overhead-Ms", f"{added * 1000:.3f}")

    async def _on_chunk(self, chunk: bytes) -> None:
        mode = self._mode
        if mode == "json":
            self._json += chunk
        elif mode == "sse":
            events = self._sse.feed(chunk)
            self._read_events(events)
            if self.call.strip_usage_chunk:
                chunk = b"".join(e.raw for e in events if not usage_only(e))
            await self._send(chunk)
        elif mode == "raw":
            self.outcome.output_bytes += len(chunk)
            await self._send(chunk)

    def _read_events(self, events: list[Event]) -> None:
        for event in events:
            self.outcome.output_bytes += len(event.data)
            # covers Gemini's usageMetadata; keep the last one seen. OpenAI's chunks say "usage":null until
            # the last: skip parsing those.
            if b"usage" in event.data and b'"usage":null' not in event.data:
                try:
                    usage = read_usage(orjson.loads(event.data))
                except orjson.JSONDecodeError:
                    continue
                if usage is not None:
                    self.outcome.usage = usage

    async def _send(self, data: bytes) -> None:
        if self._client_gone:
            return
        try:
            if data:
                self.write(data)
            await self.flush()
        except StreamClosedError:
            self._client_gone = self.outcome.aborted = True

    def on_connection_close(self) -> None:
        # Keep reading the upstream to its usage: a client that leaves mid-stream is still billed.
        self._client_gone = True
        if getattr(self, "outcome", None) is not None and not self._finished:
            self.outcome.aborted = True

    async def _finish_answer(self) -> None:
        if self._mode == "reject":
            raise ApiError(502, KEY_REJECTED)
        if self._mode == "sse":
            rest = self._sse.flush()
            self._read_events(rest)
            if self.call.strip_usage_chunk:
                await self._send(b"".join(e.raw for e in rest if not usage_only(e)))
        elif self._mode == "json":
            self._finish_json()
        if not self._client_gone:
            self.finish()

    def _finish_json(self) -> None:
        body = bytes(self._json)
        if not self.native and self.provider.rejects_operator_key(self.outcome.status, body):
            self._log_key_rejected()
            raise ApiError(502, KEY_REJECTED)
        if self.call.billable and 200 <= self.outcome.status < 300:
            try:
                self.outcome.usage = self.provider.answer_usage(self.call, orjson.loads(body))
            except orjson.JSONDecodeError:
                pass
            self.outcome.output_bytes = len(body)
            self.set_header("X-AIPipe-Cost", f"{self._cost():.10f}".rstrip("0").rstrip(".") or "0")
        self._set_overhead()
        self.write(body)
