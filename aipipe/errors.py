"""The one error type handlers raise; the base handler turns it into JSON {"message": ...}."""
from __future__ import annotations

import tornado.web


class ApiError(tornado.web.HTTPError):
    """An HTTP error with a message that is safe to show the caller."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(status)
        self.message = message
        self.headers = headers or {}
