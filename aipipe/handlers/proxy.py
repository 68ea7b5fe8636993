"""Provider passthrough: /<provider>/<path> with the user's token swapped for the operator's key.

JSON answers are held whole (to read their usage) and then sent; server-sent events are relayed
as they arrive, with a slow reader slowing the upstream read instead of growing memory.
"""
from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable

from tornado.escape import url_unescape
from tornado.iostream import StreamClosedError

from ..errors import ApiError
from ..auth import Identity
from ..gateway import Gateway, Outcome
from ..providers import PROVIDERS
from ..providers.base import NO_BODY_METHODS, Call, streamed_estimate
from ..request_path import checked_path, checked_query
from ..sse import EventSplitter, data_length, simple_data_length, split_events
from ..stream_usage import (
    event_usage,
    first_maybe_usage_only,
    may_report_usage,
    survey,
    usage_only,
)
from ..upstream import Headers, describe, header, is_timeout
from ..usage import MAX_COUNT, parse_answer
from .base import INVALID_URL, ApiHandler, copy_upstream_headers
from .lean import LeanCall

log = logging.getLogger("aipipe.proxy")

DROP_RESPONSE_HEADERS = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer", "trailers",
    "transfer-encoding", "upgrade", "content-length", "content-encoding", "set-cookie",
    "openai-organization", "openai-project", "x-consumed-content-encoding",
    # about the provider's own origin, not ours: HTTP/3 endpoints and HSTS for api.openai.com and the like
    "alt-svc", "strict-transport-security",
    # the gateway answers with its own Date and no Server; the provider's CDN and proxy internals stay there
    # (relaying a header through Tornado costs about 15,000 instructions: docs/performance.md)
    "date", "server", "cf-ray", "cf-cache-status", "x-envoy-upstream-service-time",
})
KEY_REJECTED = "provider credentials misconfigured"
def route_of(path: str) -> tuple[str, str]:
    """A provider route's first segment and the rest of its path, as the client wrote them (/openai/v1/x ->
    ("openai", "v1/x")): the text that is priced and sent upstream, not what the route's pattern decoded."""
    route, _, rest = path[1:].partition("/")
    return route, rest


class ProviderCall(LeanCall):
    """Relays one call to a provider and bills its usage."""

    route_class = "provider"  # for metrics

    def initialize(self, gateway: Gateway) -> None:
        self.gw = gateway
        self._client_gone = False  # set by on_connection_close, whenever the client leaves

    @classmethod
    def check_headers(cls, request, kwargs: dict) -> Identity:
        """Who is calling, decided before the body is read: an unknown provider is 404, a bad token 401."""
        route = route_of(request.path)[0]
        if route not in PROVIDERS:
            try:
                name = url_unescape(route, encoding=None).decode("utf-8")
            except UnicodeDecodeError:
                raise ApiError(400, INVALID_URL) from None
            raise ApiError(404, f"Unknown provider: {name}")
        return kwargs["gateway"].identify(request.headers)

    async def call(self, name: str, path: str) -> None:
        """Price, admit, forward, relay and settle one call (its caller was identified by check_headers)."""
        self.started = time.perf_counter()
        gw, req, identity = self.gw, self.request, self.checked
        route, rest = route_of(req.path)
        self.provider = provider = PROVIDERS[route]
        # the route (/geminiv1beta) may differ from the provider's config, key and ledger name (gemini)
        self.provider_name = provider.name
        if req.body and req.method in NO_BODY_METHODS:
            raise ApiError(400, f"A {req.method} request cannot carry a body")
        call = Call(req.method, checked_path("/" + rest), checked_query(req.query), req.headers, req.body)
        await provider.prepare(call, gw)
        key = identity.native_key or gw.provider_key(self.provider_name)
        native = identity.is_native
        admission = None
        if not native:  # decided on the spot when it can be, without a coroutine
            admission = gw.admit_now(identity.email, call.hold) or await gw.admit(identity.email, call.hold)
        self.call, self.outcome, self.native = call, Outcome(), native
        self.outcome.aborted = self._client_gone  # left while the call was being prepared or admitted
        self._priced = False  # outcome.cost is final (a JSON answer, priced for its X-AIPipe-Cost header)
        self._stream_gauge = None  # the open-streams gauge's labels while this call relays an event stream
        try:
            await self._forward(key)
        except asyncio.CancelledError:
            # a shutdown cut the call after it went upstream: the provider may have done the work, so it is
            # billed what it reported, else its estimate
            self.outcome.cut = self.outcome.aborted = True
            raise
        finally:
            if self._stream_gauge is not None:
                self.gw.metrics.add(self.gw.metrics.open_streams, self._stream_gauge, -1)
            if not self._priced:
                self.outcome.cost = self._cost()
            if admission is not None:
                elapsed = (time.perf_counter() - self.started) * 1000
                self.gw.settle(identity.email, admission, self.provider_name, call, self.outcome, elapsed)

    def _cost(self) -> float:
        call, out = self.call, self.outcome
        if not call.billable or not (200 <= out.status < 300 or out.cut):
            return 0.0
        if out.usage is None:
            return streamed_estimate(call, out.output_bytes)
        usage = out.usage
        if usage.input_tokens >= MAX_COUNT or usage.output_tokens >= MAX_COUNT:
            return call.hold  # a count past any real answer: billed the most the call could cost, never nothing
        try:
            cost = self.provider.cost(call, usage)
        except ArithmeticError:
            cost = math.inf
        return cost if 0.0 <= cost < math.inf else call.hold

    async def _forward(self, key: str) -> None:
        call = self.call
        self._mode = ""  # "sse" | "json" | "raw" | "reject", decided from the upstream's Content-Type
        self._json: list[bytes] = []
        timeout = self.gw.upstream_timeout
        url = self.provider.target_url(self.gw.config.providers[self.provider_name].base_url, call)
        self._sent_at = time.perf_counter()
        error = await self.gw.upstream.exchange(
            call.method, url, self.provider.forward_headers(call, key),
            call.body if call.method not in NO_BODY_METHODS else None,
            connect_timeout=min(30.0, timeout), timeout=timeout,
            on_start=self._on_response_start, on_chunk=self._on_chunk)
        metrics = self.gw.metrics
        metrics.observe(metrics.upstream_seconds, (self.provider_name,), time.perf_counter() - self._sent_at)
        if error is not None and not self._mode:
            raise self._connection_error(error)
        if error is not None:
            log.warning("upstream %s broke off mid-answer: %s", self.provider_name, describe(error))
            if self._mode == "json":  # nothing relayed yet: no 200 with half a JSON document
                self.outcome.cut = 200 <= self.outcome.status < 300  # billed as a call whose usage is unknown
                raise ApiError(502, f"{self.provider_name} broke off its answer: {describe(error)}")
        if self._mode == "sse":
            await self._finish_events()
        if error is not None and self._mode in ("sse", "raw") and not self._client_gone:
            await self._break_off()
            return
        self._finish_answer()

    async def _break_off(self) -> None:
        """The provider broke off an answer already under way: relay what came, then close the connection
        without ending the answer, so the client sees it was cut rather than a complete stream."""
        await self._sent(self._send(b""))
        self._finished = True
        self.application.log_request(self)
        self.request.connection.close()

    def _connection_error(self, error: BaseException) -> ApiError:
        # describe(), not aiohttp's own text, which can hold the provider URL with the caller's query string
        log.warning("no answer from %s: %s: %s", self.provider_name, type(error).__name__, describe(error))
        if is_timeout(error):
            return ApiError(504, f"{self.provider_name} did not answer in time")
        return ApiError(502, f"Could not reach {self.provider_name}: {describe(error)}")

    def _on_response_start(self, status: int, reason: str, headers: Headers) -> None:
        """The upstream's status line and headers, as the client parsed them."""
        self.outcome.status = status
        if status in (401, 403) and not self.native:
            self._mode = "reject"
            self._log_key_rejected()
            return
        ctype = header(headers, "content-type").lower()
        self._mode = "sse" if "text/event-stream" in ctype else "json" if "json" in ctype else "raw"
        if self._mode == "sse":
            self._events = EventSplitter()
            self._stream_gauge = (self.provider_name,)
            self.gw.metrics.add(self.gw.metrics.open_streams, self._stream_gauge)
        self._received_at = time.perf_counter()
        metrics = self.gw.metrics
        metrics.observe(metrics.upstream_ttfb, (self.provider_name,), self._received_at - self._sent_at)
        self.set_status(status, reason or None)
        copy_upstream_headers(self, headers, DROP_RESPONSE_HEADERS)
        if self._mode != "json":
            self.outcome.streamed = self._mode == "sse"
            self._set_overhead()
            # no Nagle delay between small events (Tornado turns it off only when a response finishes)
            if self._mode == "sse":
                self.request.connection.stream.set_nodelay(True)
            # Headers go with the first bytes of the body when those were read with them (one write, one
            # packet), or on their own an event-loop turn later, so clients see the stream open at once.
            asyncio.get_running_loop().call_soon(self._open_answer)

    def _open_answer(self) -> None:
        if not self._headers_written and not self._finished and not self._client_gone:
            self.flush().add_done_callback(lambda f: f.exception())

    def _log_key_rejected(self) -> None:
        log.error("%s answered %d to the operator's key: check %s", self.provider_name, self.outcome.status,
                  self.provider_name.upper() + "_API_KEY")

    def _set_overhead(self) -> None:
        added = (self._sent_at - self.started) + (time.perf_counter() - self._received_at)
        self.set_own_header("X-AIPipe-Overhead-Ms", f"{added * 1000:.3f}")

    def _on_chunk(self, chunk: bytes) -> Awaitable[None] | None:
        """A read of the answer; what it returns is awaited before the next read (nothing, for JSON)."""
        mode = self._mode
        if mode == "json":
            self._json.append(chunk)
            return None
        if mode == "sse":
            return self._relay_events(chunk)
        if mode == "raw":
            self.outcome.output_bytes += len(chunk)
            return self._sent(self._send(chunk))
        return None

    async def _relay_events(self, chunk: bytes) -> None:
        """Pass a read of an event stream on, then read it for usage (the bytes do not wait for that)."""
        region = self._events.feed(chunk)  # the events this read completes, unparsed
        if not self.call.strip_usage_chunk:
            sending = self._send(chunk)  # partial events too: the splitter keeps its own copy
            if region:
                self._read_events(region, *survey(region))
            await self._sent(sending)
            return
        # Only whole events leave, as any might be the usage chunk to hide.
        if not region:
            await self._sent(self._send(b""))
            return
        length = simple_data_length(region)
        start = first_maybe_usage_only(region, length is not None)
        if start < len(region):  # the usage chunk may be among these events: leave it out, in the same write
            region_out = region[:start] + b"".join(raw for raw in split_events(region[start:]) if not usage_only(raw))
        else:
            region_out = region
        sending = self._send(region_out)
        self._read_events(region, length, may_report_usage(region, length))
        await self._sent(sending)

    def _read_events(self, region: bytes, length: int | None, may_report: bool) -> None:
        """Count the data of region's events and keep the last usage they report (Gemini repeats usageMetadata)."""
        events = None
        if length is None:
            events = split_events(region)
            length = sum(map(data_length, events))
        self.outcome.output_bytes += length
        if not may_report:
            return
        if events is None:  # one-line events only: look at those naming usage, last first, without splitting all
            pos = region.rfind(b"usage")
            while pos >= 0:
                before = region.rfind(b"\n\n", 0, pos)
                start = before + 2 if before >= 0 else 0
                usage = event_usage(region[start:region.find(b"\n\n", pos) + 2])
                if usage is not None:
                    self.outcome.usage = usage
                    return
                pos = region.rfind(b"usage", 0, start)
            return
        for raw in reversed(events):
            usage = event_usage(raw)
            if usage is not None:
                self.outcome.usage = usage
                return

    def _send(self, data: bytes):
        """Write data and flush now; the returned future (None once the client left) is done when it is out."""
        if self._client_gone:
            return None
        try:
            if data:
                self.write(data)
            return self.flush()
        except StreamClosedError:
            self._client_gone = self.outcome.aborted = True
            return None

    async def _sent(self, sending) -> None:
        """Wait for a _send to drain, so a slow reader slows the upstream read rather than growing memory."""
        if sending is None:
            return
        try:
            await sending
        except StreamClosedError:
            self._client_gone = self.outcome.aborted = True

    def on_connection_close(self) -> None:
        # Keep reading the upstream to its usage: a client that leaves mid-stream is still billed.
        self._client_gone = True
        if getattr(self, "outcome", None) is not None and not self._finished:
            self.outcome.aborted = True

    def _finish_answer(self) -> None:
        if self._mode == "reject":
            raise ApiError(502, KEY_REJECTED)
        if self._mode == "json":
            self._finish_json()
        if not self._client_gone:
            self.finish()

    async def _finish_events(self) -> None:
        """A last event the stream ended without a blank line after: read it, and pass it on if held back."""
        rest = self._events.flush()
        if rest:
            self._read_events(rest, *survey(rest))
            if self.call.strip_usage_chunk and not usage_only(rest):
                await self._sent(self._send(rest))

    def _finish_json(self) -> None:
        body = b"".join(self._json)
        if not self.native and self.provider.rejects_operator_key(self.outcome.status, body):
            self._log_key_rejected()
            raise ApiError(502, KEY_REJECTED)
        if self.call.billable and 200 <= self.outcome.status < 300:
            answer = parse_answer(body)
            if answer is not None:
                self.outcome.usage = self.provider.answer_usage(self.call, answer)
            self.outcome.output_bytes = len(body)
            self.outcome.cost, self._priced = self._cost(), True
            self.set_own_header("X-AIPipe-Cost", f"{self.outcome.cost:.10f}".rstrip("0").rstrip(".") or "0")
        self._set_overhead()
        if body:  # none on a 204 or 304, which Tornado refuses to send with one
            self.write(body)


class ProviderHandler(ApiHandler):
    """The route of provider calls. A call is served by ProviderCall, without this RequestHandler (handlers.lean);
    what stays here is what a RequestHandler does best: CORS preflights, unknown methods (405), formatting errors.
    An unknown provider is answered 404 by ProviderCall, for every method but OPTIONS."""

    lean_call = ProviderCall
    route_class = "provider"

    @property
    def provider_name(self) -> str:
        """The provider of the route (for metrics of the errors this handler answers); "" when unknown."""
        provider = PROVIDERS.get(route_of(self.request.path)[0])
        return provider.name if provider is not None else ""
