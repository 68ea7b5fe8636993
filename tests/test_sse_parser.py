"""The event splitter finds the same events however the bytes are cut."""
from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from aipipe.sse import EventSplitter, parse_event, split_events

STREAM = (": OPENROUTER PROCESSING\n\n"
          "event: message\ndata: {\"text\": \"héllo ✓ 你好\"}\n\n"
          "data: {\"a\": 1}\r\n\r\n"
          "data: line one\ndata: line two\n\n"
          "data: [DONE]\n\n").encode()


def parse(region: bytes) -> list:
    return [parse_event(raw) for raw in split_events(region)]


def parse_in_pieces(data: bytes, cuts: list[int]):
    splitter, events = EventSplitter(), []
    last = 0
    for cut in sorted(set(cuts)) + [len(data)]:
        events += parse(splitter.feed(data[last:cut]))
        last = cut
    return events + parse(splitter.flush())


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=len(STREAM)), max_size=40))
def test_events_are_the_same_for_any_split(cuts):
    events = parse_in_pieces(STREAM, cuts)
    assert [e.data for e in events] == [b"", '{"text": "héllo ✓ 你好"}'.encode(), b'{"a": 1}', b"line one\nline two", b"[DONE]"]
    assert events[1].name == b"message"
    assert b"".join(e.raw for e in events) == STREAM  # relaying raw events reproduces the stream exactly


def test_byte_at_a_time_with_crlf_everywhere():
    data = STREAM.replace(b"\n", b"\r\n").replace(b"\r\r\n", b"\r\n")
    events = parse_in_pieces(data, list(range(len(data))))
    assert [e.data for e in events][-1] == b"[DONE]" and len(events) == 5


def test_stream_without_final_blank_line_is_flushed():
    splitter = EventSplitter()
    assert parse(splitter.feed(b"data: 1\n\ndata: 2"))[0].data == b"1"
    assert splitter.pending == b"data: 2"
    assert [e.data for e in parse(splitter.flush())] == [b"2"]
