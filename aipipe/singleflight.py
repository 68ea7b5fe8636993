"""One fetch at a time: callers that arrive while a fetch runs wait for that same fetch."""
from __future__ import annotations

import asyncio
from typing import Awaitable, Callable


class SingleFlight:
    """Coalesces concurrent runs of an async refresh (price lists, signing keys) into one."""

    def __init__(self, fetch: Callable[[], Awaitable[None]]):
        self._fetch = fetch
        self._inflight: asyncio.Future | None = None

    @property
    def running(self) -> bool:
        """Whether a fetch is in flight now."""
        return self._inflight is not None and not self._inflight.done()

    async def run(self) -> None:
        """Start the fetch unless one is running, and wait for it (a caller's cancellation leaves it running)."""
        if self._inflight is None:
            self._inflight = asyncio.ensure_future(self._fetch())
        fut = self._inflight
        try:
            await asyncio.shield(fut)
        finally:
            if self._inflight is fut and fut.done():
                self._inflight = None
