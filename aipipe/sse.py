"""Incremental server-sent-events parsing over raw bytes.

Network reads split events anywhere, even inside a multi-byte UTF-8 character, so the parser
works on bytes and only decodes complete events. Events end at a blank line: \\n\\n, \\r\\n\\r\\n or \\r\\r.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

_EVENT_END = re.compile(rb"\r\n\r\n|\n\n|\r\r")
_LINE = re.compile(rb"\r\n|\n|\r")


@dataclass(frozen=True)
class Event:
    """One complete event: its raw bytes (terminator included), `event:` name and joined `data:` lines."""

    raw: bytes
    name: bytes
    data: bytes


def parse_event(raw: bytes) -> Event:
    """Split one event's lines into name and data; comment lines (":...") are skipped."""
    name, data = b"", []
    for line in _LINE.split(raw):
        if line.startswith(b"data:"):
            data.append(line[6:] if line[5:6] == b" " else line[5:])
        elif line.startswith(b"event:"):
            name = line[6:].strip()
    return Event(raw=raw, name=name, data=b"\n".join(data))


class SSEParser:
    """Feed bytes as they arrive; get back the events they complete."""

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, chunk: bytes) -> list[Event]:
        """Events completed by this chunk, in order."""
        buf = self._buffer + chunk if self._buffer else chunk
        events, start = [], 0
        for match in _EVENT_END.finditer(buf):
            events.append(parse_event(buf[start:match.end()]))
            start = match.end()
        self._buffer = buf[start:]
        return events

    def flush(self) -> list[Event]:
        """Whatever is left at the end of the stream, as a last event (streams may end without a blank line)."""
        rest, self._buffer = self._buffer, b""
        return [parse_event(rest)] if rest.strip() else []

    @property
    def pending(self) -> bytes:
        """Bytes of an event not yet complete."""
        return self._buffer
