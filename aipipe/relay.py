"""The relay: admit, forward, relay with back-pressure, read usage and settle, for one call to a provider.

Used by the provider passthrough (handlers.proxy.ProviderCall, which sends the answer to the client as it
arrives) and by /similarity (handlers.similarity.EmbeddingsCall, which keeps it). A subclass is the client
side: it answers `_answer_started`, `write`, `flush`, `finish` and `set_own_header`.

JSON answers are held whole (to read their usage) and then written; server-sent events are relayed as they
arrive, with a slow reader slowing the upstream read instead of growing memory.
"""
from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable
from dataclasses import dataclass, replace

from tornado.iostream import StreamClosedError

from .auth import Identity
from .errors import ApiError
from .providers.base import NO_BODY_METHODS, Call, Provider, streamed_estimate
from .sse import EventSplitter, data_length, simple_data_length, split_events
from .stream_usage import event_usage, first_maybe_usage_only, may_report_usage, survey, usage_only
from .upstream import Headers, describe, header, is_timeout
from .usage import Usage, parse_answer

log = logging.getLogger("aipipe.relay")
KEY_REJECTED = "provider credentials misconfigured"


@dataclass
class Outcome:
    """What happened to a relayed call, for its ledger row."""

    status: int = 0
    usage: Usage | None = None
    streamed: bool = False
    aborted: bool = False
    output_bytes: int = 0
    cost: float = 0.0
    cut: bool = False  # forwarded, then cut off before a whole answer came (a shutdown, a broken answer)


class Relay:
    """One call to a provider, from pricing it to settling its charge."""

    gw = None  # the Gateway
    _client_gone = False  # the client left (or, for a kept answer, never was)

    async def relay(self, identity: Identity, provider: Provider, call: Call) -> None:
        """Price, check and admit call, forward it, relay the answer and settle what it cost."""
        self.started = time.perf_counter()
        gw = self.gw
        self.provider, self.provider_name = provider, provider.name
        await provider.prepare(call, gw)
        native = identity.is_native
        if not native and provider.lists_shared_objects(call) and not gw.is_admin(identity.email):
            raise ApiError(403, f"Listing {call.path} is for admins: what is stored on the provider account is "
                                "shared by every user of this server")
        admission = None
        if not native:  # a provider key passed through is the caller's own: no rules, no budget, no ledger
            key = gw.provider_key(provider.name)
            # decided on the spot when it can be, without a coroutine
            admission = gw.admit_now(identity.email, provider, call) or await gw.admit(identity.email, provider, call)
        else:
            key = identity.native_key
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
                gw.metrics.add(gw.metrics.open_streams, self._stream_gauge, -1)
            if not self._priced:
                self.outcome.cost = self._cost()
            if admission is not None:
                elapsed = (time.perf_counter() - self.started) * 1000
                gw.settle(identity.email, admission, provider.name, call, self.outcome, elapsed)

    # The client side, which subclasses provide.
    def _answer_started(self, status: int, reason: str, headers: Headers) -> None:
        """The upstream's status line and headers arrived (not for an answer refusing the operator's key)."""

    def set_own_header(self, name: str, value: str) -> None:
        """Set a header made here from numbers."""

    def write(self, chunk: bytes) -> None:
        raise NotImplementedError

    def flush(self):
        """Send what was written; a future done when it is out, or None."""
        return None

    def finish(self):
        """End the answer."""

    async def _break_off(self) -> None:
        """The provider broke off an answer already under way."""
        raise ApiError(502, f"{self.provider_name} broke off its answer")

    def _set_overhead(self) -> None:
        """Say how long the gateway's own part of the call took."""

    def _cost(self) -> float:
        """What the call is billed: its usage priced, an estimate without usage, the hold for absurd usage."""
        call, out = self.call, self.outcome
        if not call.billable or not (200 <= out.status < 300 or out.cut):
            return 0.0
        usage = out.usage
        if usage is None:
            return streamed_estimate(call, out.output_bytes)
        if usage.past_belief():
            return call.hold  # a count past any real answer: billed the most the call could cost, never nothing
        if usage.partial:  # the answer ended before its final usage report: what was relayed counts as output
            guessed = replace(usage, output_tokens=max(usage.output_tokens, out.output_bytes // 4), partial=False)
            return max(self._price_of(usage), min(self._price_of(guessed), call.hold))
        return self._price_of(usage)

    def _price_of(self, usage: Usage) -> float:
        """The provider's price for usage; the call's hold when that is not a finite, non-negative number."""
        try:
            cost = self.provider.cost(self.call, usage)
        except ArithmeticError:
            cost = math.inf
        return cost if 0.0 <= cost < math.inf else self.call.hold

    async def _forward(self, key: str) -> None:
        """Send the call upstream and relay its answer as it arrives."""
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
        if self._mode != "json":
            self.outcome.streamed = self._mode == "sse"
        self._answer_started(status, reason, headers)

    def _log_key_rejected(self) -> None:
        log.error("%s answered %d to the operator's key: check %s", self.provider_name, self.outcome.status,
                  self.provider.key_env)

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
        """Count the data of region's events and read the usage they report: the last one's, or, for a provider
        reporting usage in parts (usage_in_parts), every one's, combined."""
        events = None
        if length is None:
            events = split_events(region)
            length = sum(map(data_length, events))
        self.outcome.output_bytes += length
        if not may_report:
            return
        provider = self.provider
        reader = provider.event_usage
        if provider.usage_in_parts:
            for raw in events if events is not None else split_events(region):
                usage = event_usage(raw, reader)
                if usage is not None:
                    self.outcome.usage = provider.combine_usage(self.outcome.usage, usage)
            return
        if events is None:  # one-line events only: look at those naming usage, last first, without splitting all
            pos = region.rfind(b"usage")
            while pos >= 0:
                before = region.rfind(b"\n\n", 0, pos)
                start = before + 2 if before >= 0 else 0
                usage = event_usage(region[start:region.find(b"\n\n", pos) + 2], reader)
                if usage is not None:
                    self.outcome.usage = usage
                    return
                pos = region.rfind(b"usage", 0, start)
            return
        for raw in reversed(events):  # Gemini repeats usageMetadata, each a total so far: the last one counts
            usage = event_usage(raw, reader)
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
