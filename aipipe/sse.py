"""Incremental server-sent-events splitting over raw bytes.

Network reads split events anywhere, even inside a multi-byte UTF-8 character, so events are found
on bytes and only complete events are decoded. Events end at a blank line: \\n\\n, \\r\\n\\r\\n or \\r\\r.

The relay needs little from the events it passes on: the total length of their data (to estimate an
answer that reports no usage) and, for the rare event that can carry usage, its data. So
`EventSplitter` only finds where complete events end, and the rest is read on demand, over a whole
read at a time where it can be (`simple_data_length`) and event by event where it must
(`split_events`, `data_length`, `event_data`); `parse_event` gives an event's name and data.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

_EVENT_END = re.compile(rb"\r\n\r\n|\n\n|\r\r")
_LINE = re.compile(rb"\r\n|\n|\r")
_LONGEST_END = 4  # bytes in the longest terminator, \r\n\r\n


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


def event_data(raw: bytes) -> bytes:
    """An event's `data:` lines joined by \\n, as parse_event(raw).data."""
    return b"\n".join(line[6:] if line[5:6] == b" " else line[5:]
                      for line in _LINE.split(raw) if line.startswith(b"data:"))


def one_data_line(raw: bytes) -> bool:
    """The event is one `data:` line and its blank line (so its data is its bytes minus the two)."""
    if not raw.startswith(b"data:"):
        return False
    body = len(raw) - _terminator_length(raw)
    return raw.find(b"\n", 0, body) < 0 and raw.find(b"\r", 0, body) < 0


def _terminator_length(raw: bytes) -> int:
    if raw.endswith(b"\r\n\r\n"):
        return 4
    return 2 if raw.endswith((b"\n\n", b"\r\r")) else 0


def data_length(raw: bytes) -> int:
    """len(event_data(raw)), without building it for the usual one-line `data: ...` event."""
    if one_data_line(raw):
        return len(raw) - _terminator_length(raw) - (6 if raw[5:6] == b" " else 5)
    return len(event_data(raw))


def split_events(region: bytes) -> list[bytes]:
    """The raw events in region (terminators included); bytes after the last terminator make a last event."""
    if region.find(b"\r") < 0 and region.find(b"\n\n\n") < 0:
        parts = region.split(b"\n\n")  # every \n\n ends an event: none overlaps another
        last = parts.pop()
        events = [part + b"\n\n" for part in parts]
    else:
        events, start = [], 0
        for match in _EVENT_END.finditer(region):
            events.append(region[start:match.end()])
            start = match.end()
        last = region[start:]
    if last:
        events.append(last)
    return events


def simple_data_length(region: bytes) -> int | None:
    """Total data length of region's events when each is one `data:` line ended by \n\n (else None).

    That holds exactly when region starts with `data:`, ends with \n\n, has no \r, and has two \n
    for each `data:` that starts it or follows \n\n: then every \n is in a \n\n that ends an event
    and is followed by the next event's `data:`.
    """
    if not region.endswith(b"\n\n") or not region.startswith(b"data:") or region.find(b"\r") >= 0:
        return None
    events = region.count(b"\n\ndata:") + 1
    if region.count(b"\n") != 2 * events:
        return None
    spaced = region.count(b"\n\ndata: ") + region.startswith(b"data: ")
    return len(region) - 7 * events - spaced  # "data:" and "\n\n" per event, and the optional space


class EventSplitter:
    """Feed bytes as they arrive; get back the bytes of the events they complete, unparsed."""

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, chunk: bytes) -> bytes:
        """The complete events (terminators included) this chunk ends, as one run of bytes (b"" if none)."""
        held = self._buffer
        buf = held + chunk if held else chunk
        # held has no terminator in it, so a terminator cannot start more than 3 bytes before its end
        scan = len(held) - (_LONGEST_END - 1) if len(held) >= _LONGEST_END else 0
        if buf.find(b"\r", scan) < 0:
            # Only \n\n ends events here: a run of n newlines ends n // 2 of them, so the last event
            # ends in the last run, one short of its end if the run is odd.
            end = buf.rfind(b"\n\n", scan) + 2
            if end > 1:
                run = end - 2
                while run and buf[run - 1] == 10:
                    run -= 1
                end -= (end - run) % 2
            else:
                end = 0
        else:
            end = 0
            for match in _EVENT_END.finditer(buf, scan):
                end = match.end()
        if not end:
            self._buffer = buf
            return b""
        self._buffer = buf[end:]
        return buf if end == len(buf) else buf[:end]

    def flush(self) -> bytes:
        """Whatever is left at the end of the stream, as a last event (streams may end without a blank line)."""
        rest, self._buffer = self._buffer, b""
        return rest if rest.strip() else b""

    @property
    def pending(self) -> bytes:
        """Bytes of an event not yet complete."""
        return self._buffer
