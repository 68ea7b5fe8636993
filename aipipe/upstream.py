"""The HTTP client for calls to providers: aiohttp, with keep-alive connections pooled per host.

aiohttp's client parses answers in C and keeps connections open between calls; on the gateway's hot
path it costs about two thirds of what Tornado's client did, even with connections reused there too
(see docs/performance.md). It is the process's one client: Google's signing keys and
OpenRouter's model list are fetched through it too.

`exchange` hands an answer on as it arrives: the status line and headers once, then each network
read of the (decompressed) body, waiting for the caller before reading on, so a slow client slows
the upstream read instead of growing memory.
"""
from __future__ import annotations

import asyncio
import functools
import os
from typing import Awaitable, Callable, NamedTuple

import aiohttp
from yarl import URL

IDLE_SECONDS = 20.0  # providers close idle connections after a minute or more; stay well inside that
# aiohttp would add a Content-Type (application/octet-stream) to a body the app sent without one. Its
# User-Agent, Accept and Accept-Encoding (only codings it can undo) go where the app sent none.
SKIP_AUTO_HEADERS = frozenset({"Content-Type"})

# A POST is sent again only when its connection failed this soon: a reused connection the provider had
# closed fails at once, while a provider that took the request and then dropped it may have acted on it.
# (aiohttp itself resends GET, HEAD, OPTIONS, PUT and DELETE once.)
STALE_WINDOW = 0.5
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
WATCH_EVERY = 0.25  # seconds between deadline checks: how late past upstream_timeout a call may end
MAX_HEADER_LINE = 65536  # aiohttp's default (8190) would turn a long provider header into a 502

Headers = list[tuple[str, str]]  # an answer's header lines as sent (names and values as Latin-1, like Tornado)


class Answer(NamedTuple):
    """A whole answer (Upstream.fetch)."""

    status: int
    headers: Headers
    body: bytes


OnStart = Callable[[int, str, Headers], None]
OnChunk = Callable[[bytes], Awaitable[None] | None]  # a returned awaitable is awaited before the next read


class Upstream:
    """The pooled client of one server process (created inside its event loop on first use)."""

    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None
        # upstream_timeout: one watchdog for every call in flight rather than a timer per call (a timer per
        # call through asyncio.timeout was 1.4% of the instructions of a proxied chat call)
        self._deadlines: dict[asyncio.Task, float] = {}  # calls in flight -> loop time they must end by
        self._cut: set[asyncio.Task] = set()  # those the watchdog cancelled
        self._watching: asyncio.AbstractEventLoop | None = None  # the loop the watchdog ticks on

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=IDLE_SECONDS, ttl_dns_cache=60)
            self._session = aiohttp.ClientSession(
                connector=connector, skip_auto_headers=SKIP_AUTO_HEADERS, cookie_jar=aiohttp.DummyCookieJar(),
                max_line_size=MAX_HEADER_LINE, max_field_size=MAX_HEADER_LINE)
        return self._session

    async def exchange(self, method: str, url: str, headers: dict[str, str], body: bytes | None, *,
                       connect_timeout: float, timeout: float, on_start: OnStart,
                       on_chunk: OnChunk) -> BaseException | None:
        """Send one request; on_start(status, reason, header lines) once, then on_chunk(data) per read.

        Returns None when the answer was read to its end, or the error that prevented or cut it short.
        `timeout` bounds the whole call, time spent waiting for a slow client included.
        """
        loop = asyncio.get_running_loop()
        limits = _connect_timeout(connect_timeout)
        task = asyncio.current_task(loop)  # given the loop: asking for it again costs a getpid() system call
        cancelling = task.cancelling()  # cancellations already asked for, not ours (as asyncio.timeout does)
        outer = self._deadlines.get(task)  # a call made while the same task waits on another: the earlier deadline
        deadline = loop.time() + timeout
        self._deadlines[task] = deadline if outer is None else min(outer, deadline)
        if self._watching is not loop:
            self._watching = loop
            loop.call_later(WATCH_EVERY, self._watch, loop)
        try:
            for attempt in (1, 2):
                started, sent = False, loop.time()
                try:
                    # encoded=True: sent as written, with no dot segments folded or escapes re-read (request_path)
                    async with self.session.request(method, URL(url, encoded=True), headers=headers, data=body,
                                                    timeout=limits,
                                                    allow_redirects=False) as response:
                        started = True
                        on_start(response.status, response.reason or "",
                                 [(k.decode("latin-1"), v.decode("latin-1")) for k, v in response.raw_headers])
                        async for data in response.content.iter_any():
                            pending = on_chunk(data)
                            if pending is not None:  # the caller wants to finish with this read first
                                await pending
                    return None
                except (aiohttp.ClientError, OSError) as error:
                    stale = (method not in IDEMPOTENT and loop.time() - sent < STALE_WINDOW
                             and is_stale_connection(error))
                    if started or attempt == 2 or not stale:
                        return error
                except TimeoutError as error:  # aiohttp's connect timeout
                    return error
        except asyncio.CancelledError:
            if task in self._cut and task.uncancel() <= cancelling:
                return TimeoutError(f"no answer within {timeout:g} s")
            raise  # someone else's cancellation (a shutdown, say): not a timeout
        finally:
            if outer is None:
                self._deadlines.pop(task, None)
            else:
                self._deadlines[task] = outer
            self._cut.discard(task)
        return None  # not reached: the second attempt returns

    def _watch(self, loop: asyncio.AbstractEventLoop) -> None:
        """Cancel the calls past their deadline; look again in WATCH_EVERY seconds while calls are in flight."""
        if self._watching is not loop:  # calls moved to another loop, which has a watchdog of its own
            return
        now, mine = loop.time(), False
        for task, deadline in list(self._deadlines.items()):
            if task.get_loop() is not loop:
                if task.get_loop().is_closed():  # left behind by a loop that ended
                    del self._deadlines[task]
                continue
            mine = True
            if deadline <= now and task not in self._cut:
                self._cut.add(task)
                task.cancel()
        if mine:
            loop.call_later(WATCH_EVERY, self._watch, loop)
        else:
            self._watching = None

    async def fetch(self, method: str, url: str, headers: dict[str, str] | None = None, body: bytes | None = None, *,
                    connect_timeout: float = 30.0, timeout: float = 30.0) -> Answer | BaseException:
        """A whole answer, or the error that prevented it."""
        start: list = []
        parts: list[bytes] = []
        error = await self.exchange(method, url, headers or {}, body, connect_timeout=connect_timeout,
                                    timeout=timeout, on_start=lambda *line: start.extend(line), on_chunk=parts.append)
        return error if error is not None else Answer(start[0], start[2], b"".join(parts))

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


@functools.lru_cache(maxsize=8)
def _connect_timeout(seconds: float) -> aiohttp.ClientTimeout:
    return aiohttp.ClientTimeout(total=None, connect=seconds)


def header(lines: Headers, name: str) -> str:
    """The first value of header `name` (lower-case) among an answer's header lines, else ""."""
    return next((value for key, value in lines if key.lower() == name), "")


def is_stale_connection(error: BaseException) -> bool:
    """Whether error is a kept-alive connection the provider had closed: a disconnect before any answer, or a
    reset while the request was still being written (then the provider cannot have acted on it). A reset
    after the request was sent whole is not: the provider may have started on it, and sending it again could
    have it run, and cost, twice."""
    if isinstance(error, aiohttp.ServerDisconnectedError):
        return True
    return (isinstance(error, aiohttp.ClientOSError) and not isinstance(error, aiohttp.ClientConnectorError)
            and str(error).startswith("Can not write request body"))  # aiohttp's words for a failed write


def is_timeout(error: BaseException) -> bool:
    return isinstance(error, TimeoutError)  # asyncio's, aiohttp's connect and read timeouts alike


def describe(error: BaseException) -> str:
    """What went wrong, for an error message: never aiohttp's own text, which can carry the provider's URL."""
    if isinstance(error, aiohttp.ClientConnectorCertificateError):
        return "its TLS certificate could not be verified"
    if isinstance(error, aiohttp.ClientConnectorError):
        number = getattr(error.os_error, "errno", None)
        return f"cannot connect ({os.strerror(number) if number else type(error.os_error).__name__})"
    if is_timeout(error):
        return "no answer in time"
    if isinstance(error, aiohttp.ServerDisconnectedError):
        return "the connection closed before the answer was complete"
    if isinstance(error, aiohttp.ClientPayloadError):
        return "the answer was cut short"
    if isinstance(error, aiohttp.ClientOSError):
        number = getattr(error, "errno", None)
        return f"the connection failed ({os.strerror(number) if number else 'reset'})"
    if isinstance(error, aiohttp.ClientResponseError):
        return "the answer was not valid HTTP"
    return type(error).__name__
