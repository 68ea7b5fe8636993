"""Which events of a stream can carry usage, and the usage they report.

Most events of a chat stream carry none, or say so as OpenAI's `"usage":null`: they are told apart on raw
bytes, with a scan or two and no parsing; only an event that may report usage is parsed as JSON. The
relay also hides the usage-only chunk it asked for on the app's behalf (`usage_only`).
"""
from __future__ import annotations

import re

import orjson

from .sse import event_data, one_data_line, simple_data_length
from .usage import Usage, parse_answer, read_usage

_NAMED_USAGE = re.compile(rb'"usage"(?!:null)')


def _usage_data(raw: bytes) -> bytes | None:
    """The event's data if it may report usage: it names usage, and not as OpenAI's "usage":null."""
    if b"usage" not in raw or (b'"usage":null' in raw and one_data_line(raw)):
        return None  # most events: no JSON to parse
    data = event_data(raw)
    return data if b"usage" in data and b'"usage":null' not in data else None


def event_usage(raw: bytes, reader=read_usage) -> Usage | None:
    """Usage reported by one raw event, read from its parsed data by `reader` (a provider's event_usage), else
    None."""
    data = _usage_data(raw)
    if data is None:
        return None
    return reader(parse_answer(data))


def may_report_usage(region: bytes, length: int | None) -> bool:
    """Whether any of region's events may report usage. Not the usual chunk: one `data:` line (`length`
    is known) that names usage only as "usage":null, or not at all. Telling takes a scan or two, no parsing."""
    mentions = region.count(b"usage")
    return mentions != 0 and (length is None or mentions != region.count(b'"usage":null'))


def survey(region: bytes) -> tuple[int | None, bool]:
    """simple_data_length(region) and may_report_usage(region)."""
    length = simple_data_length(region)
    return length, may_report_usage(region, length)


def first_maybe_usage_only(region: bytes, simple: bool) -> int:
    """Where the first event of region that may_be_usage_only starts (len(region) if none): in a region of
    one-line events (`simple`), the one naming "usage" other than as "usage":null; otherwise, to be safe, 0."""
    if not simple:
        return 0
    named = _NAMED_USAGE.search(region) if b'"choices"' in region else None
    if named is None:
        return len(region)
    before = region.rfind(b"\n\n", 0, named.start())
    return before + 2 if before >= 0 else 0


def may_be_usage_only(raw: bytes) -> bool:
    """Cheap test on raw bytes: the event could be the usage-only chunk (never false for one that is)."""
    return b'"choices"' in raw and b'"usage"' in raw and not (b'"usage":null' in raw and one_data_line(raw))


def usage_only(raw: bytes) -> bool:
    """The chunk OpenAI adds for include_usage: usage and an empty choices list."""
    if not may_be_usage_only(raw):
        return False
    data = event_data(raw)
    if b'"choices"' not in data or b'"usage"' not in data or b'"usage":null' in data:
        return False
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:
        return False
    return isinstance(obj, dict) and obj.get("choices") == [] and isinstance(obj.get("usage"), dict)
