"""The path and query of a provider call, checked so that what is priced is exactly what goes upstream.

Whether a call is billed is decided from its path (`/v1/files` is free, `/v1/chat/completions` is not).
An HTTP client or a provider's front end may read a path differently from the way it was written:
`..` segments are folded, `%2f` may become a slash, `%23` and `%3F` may start a fragment or a query, a
backslash may be a slash, `;` may start parameters. Rather than guess every reading, a provider path is
held to plain segments, which every reader reads the same way, and the same text is then both priced
and sent. Real provider paths (ids such as `file-abc`, `ft:gpt-4o-mini:org::id`, Gemini's
`models/gemini-2.5-flash:generateContent`) never need more.
"""
from __future__ import annotations

import re

from .errors import ApiError

# RFC 3986 pchar minus percent-encoding and ";" (parameters, which some servers strip).
_SEGMENT = r"[A-Za-z0-9\-._~:@!$&'()*+,=]+"
PLAIN_PATH = re.compile(rf"(?:/{_SEGMENT})*/?")
DOT_SEGMENT = re.compile(r"/\.{1,2}(?:/|$)")
# Anything but printable ASCII, and what a URL cannot carry raw; "#" would start a fragment the provider never sees.
BAD_QUERY = re.compile(r"[^\x21-\x7e]|[#\\\"<>^`{|}]")
PATH_REFUSED = ("Path not allowed: use plain path segments (no dot segments, empty segments, percent-encoding, "
                "backslashes, semicolons or control characters)")
QUERY_REFUSED = "Query not allowed: it has control characters, spaces or characters a URL cannot carry"


def checked_path(raw: str) -> str:
    """The provider path (as the client wrote it, from "/" on) if it is plain; 400 otherwise."""
    if PLAIN_PATH.fullmatch(raw) is None or DOT_SEGMENT.search(raw) is not None:
        raise ApiError(400, PATH_REFUSED)
    return raw


def checked_query(raw: str) -> str:
    """The query string as sent, if a URL can carry it unchanged; 400 otherwise."""
    if raw and BAD_QUERY.search(raw) is not None:
        raise ApiError(400, QUERY_REFUSED)
    return raw
