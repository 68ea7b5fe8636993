"""The HTTP client for calls to providers: aiohttp, with keep-alive connections pooled per host.

aiohttp's client parses answers in C and keeps connections open between calls; on the gateway's hot
path it costs about two thirds of what Tornado's client did, even with connections reused there too
(see the README's Performance section). Google's keys and OpenRouter's model list, fetched now and
then, still use Tornado's client.

`exchange` hands an answer on as it arrives: the status line and headers once, then each network
read of the (decompressed) body, waiting for the caller before reading on, so a slow client slows
the upstream read instead of growing memory.
"""
from __future__ import annotations

import asyncio
from typing import Awaitable, Callable

import aiohttp
from multidict import CIMultiDictProxy

IDLE_SECONDS = 20.0  # providers close idle connections after a minute or more; stay well inside that
# aiohttp would add a Content-Type (application/octet-stream) to a body the app sent without one. Its
# User-Agent, Accept and Accept-Encoding (only codings it can undo) go where the app sent none.
SKIP_AUTO_HEADERS = frozenset({"Content-Type"})

OnStart = Callable[[int, str, CIMultiDictProxy], None]
OnChunk = Callable[[bytes], Awaitable[None]]


class Upstream:
    """The pooled client of one server process (created inside its event loop on first use)."""

    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=IDLE_SECONDS, ttl_dns_cache=60)
            self._session = aiohttp.ClientSession(connector=connector, skip_auto_headers=SKIP_AUTO_HEADERS,
                                                  cookie_jar=aiohttp.DummyCookieJar())
        return self._session

    async def exchange(self, method: str, url: str, headers: dict[str, str], body: bytes | None, *,
                       connect_timeout: float, timeout: float, on_start: OnStart,
                       on_chunk: OnChunk) -> BaseException | None:
        """Send one request; on_start(status, reason, headers) once, then `await on_chunk(data)` per read.

        Returns None when the answer was read to its end, or the error that prevented or cut it short.
        A reused connection the provider closed just as the request went out fails before any answer:
        that is tried once more, on a new connection.
        """
        limits = aiohttp.ClientTimeout(total=timeout, connect=connect_timeout)
        for attempt in (1, 2):
            started = False
            try:
                async with self.session.request(method, url, headers=headers, data=body, timeout=limits,
                                                allow_redirects=False) as response:
                    started = True
                    on_start(response.status, response.reason or "", response.headers)
                    async for data in response.content.iter_any():
                        await on_chunk(data)
                return None
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as error:
                if started or attempt == 2 or not isinstance(error, aiohttp.ServerDisconnectedError):
                    return error
        return None  # not reached: the second attempt returns

    async def fetch(self, method: str, url: str, headers: dict[str, str], body: bytes | None, *,
                    connect_timeout: float, timeout: float) -> tuple[int, bytes] | BaseException:
        """A whole answer as (status, body), or the error that prevented it."""
        status, parts = 0, []

        def on_start(code: int, reason: str, headers) -> None:
            nonlocal status
            status = code

        async def on_chunk(data: bytes) -> None:
            parts.append(data)

        error = await self.exchange(method, url, headers, body, connect_timeout=connect_timeout, timeout=timeout,
                                    on_start=on_start, on_chunk=on_chunk)
        return error if error is not None else (status, b"".join(parts))

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def is_timeout(error: BaseException) -> bool:
    return isinstance(error, (asyncio.TimeoutError, aiohttp.ServerTimeoutError))


def describe(error: BaseException) -> str:
    """What went wrong, for a 502's message: aiohttp's text, or the error's kind when it has none."""
    return str(error) or type(error).__name__
