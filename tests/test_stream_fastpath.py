"""The relay's fast path: chunked answers decoded a read at a time, events passed on before they are read,
and the same bytes, output count and usage as reading every event in full would give."""
from __future__ import annotations

import asyncio
import re
from types import SimpleNamespace

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tornado.httpclient import HTTPRequest

from aipipe.relay import Outcome
from aipipe.handlers.proxy import ProviderCall
from aipipe.providers import PROVIDERS
from aipipe.sse import EventSplitter, data_length, parse_event, simple_data_length, split_events
from aipipe.usage import read_usage

from .conftest import token
from .helpers import chat, spent

pytestmark = pytest.mark.every_gateway  # over each store and admission (conftest.GATEWAY_MODES)

MINI = 12 * 0.15e-6 + 7 * 0.6e-6  # gpt-4o-mini, 12 prompt and 7 completion tokens


# -- a reference: every event parsed in full, as the relay did before the fast path ---------------------------

END = re.compile(rb"\r\n\r\n|\n\n|\r\r")


def reference_events(buf: bytes) -> tuple[list[bytes], bytes]:
    events, start = [], 0
    for m in END.finditer(buf):
        events.append(buf[start:m.end()])
        start = m.end()
    return events, buf[start:]


def reference_usage_only(data: bytes) -> bool:
    if b'"choices"' not in data or b'"usage"' not in data or b'"usage":null' in data:
        return False
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:
        return False
    return isinstance(obj, dict) and obj.get("choices") == [] and isinstance(obj.get("usage"), dict)


def reference_relay(pieces: list[bytes], strip: bool) -> tuple[bytes, int, object]:
    out, count, usage, held = [], 0, None, b""

    def read(raws):
        nonlocal count, usage
        kept = []
        for raw in raws:
            data = parse_event(raw).data
            count += len(data)
            if b"usage" in data and b'"usage":null' not in data:
                try:
                    found = read_usage(orjson.loads(data))
                except orjson.JSONDecodeError:
                    found = None
                usage = found or usage
            if not reference_usage_only(data):
                kept.append(raw)
        return b"".join(kept)

    for piece in pieces:
        events, held = reference_events(held + piece)
        kept = read(events)
        out.append(kept if strip else piece)
    if held.strip():
        kept = read([held])
        if strip:
            out.append(kept)
    return b"".join(out), count, usage


class Relay:
    """ProviderCall's event relay without Tornado: what it sends, counts and finds."""

    provider = PROVIDERS["openai"]
    _relay_events = ProviderCall._relay_events
    _read_events = ProviderCall._read_events
    _finish_events = ProviderCall._finish_events

    def __init__(self, strip: bool):
        self.call = SimpleNamespace(strip_usage_chunk=strip)
        self.outcome, self._events, self.sent = Outcome(), EventSplitter(), []

    def _send(self, data: bytes):
        self.sent.append(data)
        return None

    async def _sent(self, sending) -> None:
        pass

    def run(self, pieces: list[bytes]) -> tuple[bytes, int, object]:
        async def go():
            for piece in pieces:
                await self._relay_events(piece)
            await self._finish_events()
        asyncio.run(go())
        return b"".join(self.sent), self.outcome.output_bytes, self.outcome.usage


def delta(text: str, usage_null: bool) -> bytes:
    obj = {"id": "c", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": text}}]}
    return orjson.dumps({**obj, "usage": None} if usage_null else obj)


USAGE = {"prompt_tokens": 12, "completion_tokens": 7, "total_tokens": 19}
EVENTS = st.sampled_from([
    b"data: " + delta("hé ✓ 你好", True),
    b"data: " + delta("tok", True),
    b"data:" + delta("no space", True),
    b"data: " + delta("tok", False),
    b"data: " + delta("talks about usage", True),
    b"data: " + orjson.dumps({"id": "c", "choices": [], "usage": USAGE}),
    b"data: " + orjson.dumps({"id": "c", "choices": [{"delta": {}}], "usage": {**USAGE, "completion_tokens": 9}}),
    b"data: " + orjson.dumps({"candidates": [{"content": {}}], "usageMetadata": {"promptTokenCount": 3,
                                                                                "candidatesTokenCount": 4}}),
    b"event: response.completed\ndata: " + orjson.dumps({"response": {"usage": {"input_tokens": 5, "output_tokens": 6}}}),
    b"data: {\"choices\":[],\ndata: \"usage\":{\"prompt_tokens\":1}}",  # usage-only, on two data lines
    b'data: {"choices": [], "usage": {"prompt_tokens": 2, "completion_tokens": 3}}',  # spaced, as Python writes it
    b": keep-alive",
    b": \"usage\":null",
    b"data: {\"usage\": broken json",
    b"data: [DONE]",
    b"",
])
SEPARATORS = st.sampled_from([b"\n\n", b"\n\n", b"\r\n\r\n", b"\r\r", b"\n\n\n"])


@st.composite
def streams(draw):
    events = draw(st.lists(st.tuples(EVENTS, SEPARATORS), max_size=12))
    crlf = draw(st.booleans())
    body = b"".join((e.replace(b"\n", b"\r\n") if crlf and sep == b"\r\n\r\n" else e) + sep for e, sep in events)
    if draw(st.booleans()):
        body += draw(EVENTS)  # ends without a blank line
    cuts = sorted(set(draw(st.lists(st.integers(0, len(body)), max_size=8))))
    return [body[a:b] for a, b in zip([0] + cuts, cuts + [len(body)])]


@settings(max_examples=400, deadline=None)
@given(streams(), st.booleans())
def test_relay_sends_counts_and_bills_as_reading_every_event_would(pieces, strip):
    assert Relay(strip).run(pieces) == reference_relay(pieces, strip)


@settings(max_examples=300, deadline=None)
@given(streams())
def test_splitter_and_lengths_agree_with_parsing(pieces):
    splitter, found = EventSplitter(), []
    for piece in pieces:
        region = splitter.feed(piece)
        found += split_events(region)
        length = simple_data_length(region)
        if length is not None:
            assert length == sum(len(parse_event(raw).data) for raw in split_events(region))
    events, rest = reference_events(b"".join(pieces))
    assert found == events and splitter.pending == rest
    assert [data_length(raw) for raw in events] == [len(parse_event(raw).data) for raw in events]


def test_usual_read_is_counted_without_splitting_it():
    region = b"".join(b"data: " + delta("tok", True) + b"\n\n" for _ in range(50))
    assert simple_data_length(region) == 50 * len(delta("tok", True))
    assert simple_data_length(region + b": ping\n\n") is None
    assert simple_data_length(region.replace(b"\n\n", b"\r\n\r\n")) is None


# -- over the network ----------------------------------------------------------------------------------------------

class HeldStream:
    """A provider on a raw socket: answers a chat stream with three events, holds the rest until released."""

    def __init__(self, after: bytes = b""):
        self.release, self.connections, self.after = asyncio.Event(), 0, after

    async def start(self) -> str:
        self.server = await asyncio.start_server(self.serve, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def serve(self, reader, writer) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
                await reader.readexactly(length)
                self.release.clear()
                first = b"".join(b"data: " + delta(w, True) + b"\n\n" for w in ("one ", "two ", "three"))
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
                             + b"%x\r\n%s\r\n" % (len(first), first))
                await writer.drain()
                await asyncio.wait_for(self.release.wait(), 10)
                last = b"data: " + orjson.dumps({"id": "c", "choices": [], "usage": USAGE}) + b"\n\ndata: [DONE]\n\n"
                writer.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(last), last) + self.after)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.TimeoutError):
            pass
        finally:
            writer.close()


async def stream_through(base: str, t: str, provider: HeldStream) -> bytes:
    got = []
    request = HTTPRequest(base + "/openai/v1/chat/completions", method="POST", body=orjson.dumps(chat(stream=True)),
                          headers={"Authorization": f"Bearer {t}", "Content-Type": "application/json"},
                          streaming_callback=got.append, request_timeout=20)
    from tornado.httpclient import AsyncHTTPClient
    client = AsyncHTTPClient(force_instance=True)
    fetch = asyncio.ensure_future(client.fetch(request, raise_error=False))
    for _ in range(500):  # bounded: the first events must arrive while the provider holds the rest
        if b"three" in b"".join(got) or fetch.done():
            break
        await asyncio.sleep(0.01)
    assert b"three" in b"".join(got) and not provider.release.is_set()
    provider.release.set()
    response = await fetch
    client.close()
    assert response.code == 200
    return b"".join(got)


@pytest.mark.gen_test(timeout=30)
async def test_events_leave_as_they_arrive_and_the_stream_is_billed(make_gateway, serve):
    provider = HeldStream()
    gw = await make_gateway(providers={"openai": {"base_url": await provider.start()}})
    base, t = serve(gw), token("held@example.com")
    for _ in range(2):
        body = await stream_through(base, t, provider)
        assert b'"choices":[]' not in body and body.endswith(b"data: [DONE]\n\n")  # the usage chunk we asked for
    assert provider.connections == 1  # and the connection was reused
    assert await spent(gw, "held@example.com") == pytest.approx(2 * MINI, abs=1e-12)
    provider.server.close()


@pytest.mark.gen_test(timeout=30)
async def test_bytes_after_an_answer_do_not_reach_the_next_one(make_gateway, serve):
    provider = HeldStream(after=b"HTTP/1.1 200 OK\r\n")
    gw = await make_gateway(providers={"openai": {"base_url": await provider.start()}})
    base, t = serve(gw), token("stray@example.com")
    bodies = [await stream_through(base, t, provider) for _ in range(2)]
    assert bodies[1] == bodies[0] and bodies[0].endswith(b"data: [DONE]\n\n") and b"HTTP/1.1" not in bodies[1]
    assert await spent(gw, "stray@example.com") == pytest.approx(2 * MINI, abs=1e-12)
    provider.server.close()
