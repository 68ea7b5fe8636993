"""The requests a server is serving, so that a shutdown lets them finish (and bills them) before it exits.

Provider calls run as tasks of their own (handlers.lean); other routes as RequestHandlers. On SIGTERM the
server stops accepting, waits while either kind is open, for at most `[server] drain_seconds`, and then
cancels the calls still running: each settles in its own `finally`, billed the usage it reported or else
its estimate, before the ledger is flushed.
"""
from __future__ import annotations

import asyncio
import logging
import weakref

log = logging.getLogger("aipipe")
POLL_SECONDS = 0.05


class OpenRequests:
    """Provider-call tasks and RequestHandlers still at work."""

    def __init__(self) -> None:
        self.tasks: set[asyncio.Task] = set()  # provider calls' tasks: added and taken out by handlers.lean
        self.handlers: weakref.WeakSet = weakref.WeakSet()

    def add_handler(self, handler) -> None:
        """Track a RequestHandler until it finishes or its client leaves."""
        self.handlers.add(handler)

    def open_handlers(self) -> list:
        """RequestHandlers that have not finished (a client that left does not end a /similarity call, which is
        still billed when its provider answers)."""
        return [handler for handler in list(self.handlers) if not handler._finished]

    def count(self) -> int:
        """How many requests are open."""
        return len(self.tasks) + len(self.open_handlers())

    async def drain(self, seconds: float) -> int:
        """Wait up to `seconds` for open requests to finish, then cut the provider calls still running.

        Returns how many were cut."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while self.count() and loop.time() < deadline:
            await asyncio.sleep(POLL_SECONDS)
        left = list(self.tasks)
        for task in left:
            task.cancel()
        if left:
            log.warning("cut %d calls still open after %.0f s; each is billed what it reported, else its estimate",
                        len(left), seconds)
            await asyncio.wait(left, timeout=5)
        return len(left)
