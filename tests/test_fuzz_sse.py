"""Fuzzing the event splitter, the usage readers and the relay: real provider streams with generated usage,
cut anywhere, give the same events and the same usage as whole; random bytes never raise; and through the
real gateway app, the client gets the provider's bytes (minus the usage chunk the gateway asked for) and the
ledger holds the price of the usage the provider sent, to 1e-9 USD."""
from __future__ import annotations

import asyncio
import math
import uuid

import orjson
import pytest
import tornado.httpserver
import tornado.testing
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from tornado.httpclient import AsyncHTTPClient, HTTPRequest

from aipipe.config import build_config
from aipipe.gateway import Gateway
from aipipe.server import make_app
from aipipe.sse import EventSplitter, data_length, parse_event, simple_data_length, split_events
from aipipe.storage import open_store
from aipipe.stream_usage import event_usage, first_maybe_usage_only, may_be_usage_only, survey, usage_only
from aipipe.usage import read_usage

from .conftest import ENV, base_config, token
from .fake_upstream import FakeState, make_fake_app
from .soak_support import (
    GEMINI_MODEL,
    OPENAI_MODEL,
    OPENROUTER_MODEL,
    Sent,
    gemini_stream,
    openai_chat,
    openrouter_chat,
    price_of,
    responses_stream,
)
from .test_stream_fastpath import Relay

# -- what the providers send ----------------------------------------------------------------------------------

# Answer text: any Unicode, plus pieces that look like the wire format itself (escaped inside the JSON string).
TEXT = st.lists(st.one_of(
    st.text(max_size=10),
    st.sampled_from(["\n\n", "\r\n\r\n", "data: ", "event: x", ": comment", '"choices": []', "usage", '"usage": {}',
                     "[DONE]", "✓ 你好", "\u2028", "usageMetadata", "\\", "é" * 40]),
), max_size=6).map(lambda parts: parts)
TOKENS = st.integers(min_value=0, max_value=2_000_000)


@st.composite
def sent_usage(draw, cost: bool = False) -> Sent:
    prompt = draw(TOKENS)
    completion = draw(TOKENS)
    s = Sent(prompt, completion, cached=draw(st.integers(0, prompt)), reasoning=draw(st.integers(0, completion)))
    if cost:
        s.cost = draw(st.none() | st.floats(min_value=0, max_value=5, allow_nan=False, allow_infinity=False))
    return s


@st.composite
def provider_streams(draw):
    """(kind, Stream): a real provider's stream built around generated usage and text."""
    kind = draw(st.sampled_from(["openai", "openai-multiline", "responses", "gemini", "openrouter"]))
    texts = draw(TEXT)
    sep = draw(st.sampled_from([b"\n\n", b"\r\n\r\n"]))
    if kind.startswith("openai"):
        return kind, openai_chat(draw(sent_usage()), texts, sep=sep, multiline=kind.endswith("multiline"),
                                 usage_null=draw(st.booleans()))
    if kind == "responses":
        return kind, responses_stream(draw(sent_usage()), texts, sep=sep)
    if kind == "gemini":
        s = draw(sent_usage())
        s.prompt = min(s.prompt, 200_000)  # below Gemini's long-prompt prices
        s.cached = min(s.cached, s.prompt)
        return kind, gemini_stream(s, texts, sep=draw(st.sampled_from([b"\r\n\r\n", b"\n\n"])))
    return kind, openrouter_chat(draw(sent_usage(cost=True)), texts, sep=sep, comments=draw(st.integers(0, 3)))


def cut(body: bytes, positions: list[int]) -> list[bytes]:
    """body cut at the given positions (a network's reads)."""
    points = sorted({p % (len(body) + 1) for p in positions})
    edges = [0, *points, len(body)]
    return [body[a:b] for a, b in zip(edges, edges[1:]) if b > a]


CUTS = st.lists(st.integers(min_value=0, max_value=10**6), max_size=30)


def feed(pieces: list[bytes]) -> tuple[list[bytes], bytes]:
    """What an EventSplitter hands back for each piece, and its flush."""
    splitter = EventSplitter()
    regions = [splitter.feed(p) for p in pieces]
    return regions, splitter.flush()


def last_usage(events: list[bytes]):
    found = None
    for raw in events:
        found = event_usage(raw) or found
    return found


# -- the splitter and the usage readers -----------------------------------------------------------------------

@settings(max_examples=300, deadline=None)
@given(provider_streams(), CUTS)
def test_real_streams_cut_anywhere_give_the_same_events_and_usage_as_whole(stream, positions):
    kind, s = stream
    body = s.body
    whole, rest = feed([body])
    assert whole == [body] and rest == b""  # every event of a well-formed stream ends with its blank line
    regions, rest = feed(cut(body, positions))
    assert rest == b""
    assert b"".join(regions) == body
    events = [raw for region in regions for raw in split_events(region)]
    assert events == s.events  # the same events, byte for byte, wherever the reads split them
    assert last_usage(events) == s.usage == read_usage(orjson.loads(parse_event(
        next(e for e in reversed(s.events) if b"sage" in e)).data))
    assert [i for i, raw in enumerate(events) if usage_only(raw)] == ([s.usage_only] if s.usage_only is not None else [])
    for raw in events:
        assert data_length(raw) == len(parse_event(raw).data)
        assert may_be_usage_only(raw) or not usage_only(raw)
    for region in regions:
        length, may_report = survey(region)
        inside = split_events(region)
        if length is not None:
            assert length == sum(map(data_length, inside)) == simple_data_length(region)
        if any(event_usage(raw) is not None for raw in inside):
            assert may_report
        start = first_maybe_usage_only(region, length is not None)
        assert not any(usage_only(raw) for raw in split_events(region[:start]))


@settings(max_examples=300, deadline=None)
@given(provider_streams(), CUTS, st.booleans())
def test_the_relay_sends_counts_and_finds_the_usage_sent_however_reads_split(stream, positions, asked_for_usage):
    kind, s = stream
    strip = kind.startswith("openai") and not asked_for_usage
    sent, counted, usage = Relay(strip).run(cut(s.body, positions))
    assert sent == (s.without_usage_only() if strip else s.body)
    assert usage == s.usage
    assert counted == sum(len(parse_event(raw).data) for raw in s.events)


@st.composite
def sse_noise(draw) -> bytes:
    """Bytes that are mostly SSE-shaped: wire-format fragments, JSON with usage, and random bytes mixed."""
    frag = st.one_of(
        st.sampled_from([b"data:", b"data: ", b"event: ", b":", b"\n", b"\r", b"\r\n", b"\n\n", b"\r\n\r\n", b"\r\r",
                         b"[DONE]", b'"usage":null', b'"usage"', b'"choices":[]', b"usageMetadata", b"{", b"}",
                         b'{"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2}}',
                         b'{"usage":{"prompt_tokens":-5,"completion_tokens":1e308,"cost":-1}}',
                         b'{"usageMetadata":{"promptTokenCount":"x","candidatesTokensDetails":[1,{"modality":"AUDIO"}]}}',
                         b'{"response":{"usage":[]}}', b"\xff\xfe", b"\xe2\x9c", b"\x00"]),
        st.binary(max_size=12))
    return b"".join(draw(st.lists(frag, max_size=40)))


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.binary(max_size=400), sse_noise()), CUTS, st.booleans())
def test_random_bytes_never_raise_in_the_splitter_the_readers_or_the_relay(data, positions, strip):
    pieces = cut(data, positions)
    regions, rest = feed(pieces)
    done = b"".join(regions)
    left = data[len(done):]
    assert data.startswith(done) and rest == (left if left.strip() else b"")
    for region in [*regions, rest]:
        survey(region)
        first_maybe_usage_only(region, simple_data_length(region) is not None)
        for raw in split_events(region):
            parse_event(raw)
            data_length(raw)
            usage_only(raw)
            usage = event_usage(raw)
            if usage is not None:
                assert min(usage.input_tokens, usage.output_tokens, usage.cached_tokens, usage.reasoning_tokens) >= 0
    Relay(strip).run(pieces)


# -- read_usage on any JSON -----------------------------------------------------------------------------------

JSON_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**64 - 1),
                         st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=5))
USAGE_KEYS = ["prompt_tokens", "completion_tokens", "input_tokens", "output_tokens", "cached_tokens", "audio_tokens",
              "image_tokens", "reasoning_tokens", "cost", "type", "seconds", "prompt_tokens_details",
              "completion_tokens_details", "input_tokens_details", "output_tokens_details", "promptTokenCount",
              "candidatesTokenCount", "thoughtsTokenCount", "cachedContentTokenCount", "promptTokensDetails",
              "candidatesTokensDetails", "modality", "tokenCount", "usage", "usageMetadata", "response", "model"]
JSON_VALUES = st.recursive(
    JSON_SCALARS | st.just("duration") | st.just("AUDIO"),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(USAGE_KEYS), inner, max_size=5),
    max_leaves=25)


@settings(max_examples=500, deadline=None)
@example({"usage": {"type": "duration", "seconds": "ninety"}})
@example({"usage": {"type": "duration", "seconds": -90}})
@given(st.dictionaries(st.sampled_from(USAGE_KEYS), JSON_VALUES, max_size=5))
def test_read_usage_takes_any_json_and_never_reports_a_credit(obj):
    obj = orjson.loads(orjson.dumps(obj))  # only what a provider's JSON can hold
    usage = read_usage(obj)
    if usage is None:
        return
    for count in (usage.input_tokens, usage.output_tokens, usage.cached_tokens, usage.audio_input_tokens,
                  usage.audio_output_tokens, usage.image_input_tokens, usage.reasoning_tokens):
        assert isinstance(count, int) and count >= 0
    assert math.isfinite(usage.seconds) and usage.seconds >= 0


def test_read_usage_without_whisper_seconds_takes_any_json():
    """The same as above with 'seconds' left out, so the rest of the readers stay covered while that bug is open."""
    @settings(max_examples=500, deadline=None)
    @given(st.dictionaries(st.sampled_from([k for k in USAGE_KEYS if k != "seconds"]), JSON_VALUES, max_size=5))
    def check(obj):
        usage = read_usage(orjson.loads(orjson.dumps(obj)))
        if usage is not None:
            assert min(usage.input_tokens, usage.output_tokens, usage.cached_tokens, usage.audio_input_tokens,
                       usage.audio_output_tokens, usage.image_input_tokens, usage.reasoning_tokens) >= 0
    check()


# -- the answer's own text must not hide its usage ------------------------------------------------------------

TRAP = 'print({"usage":null})'  # text a model may well write; the relay looks for "usage":null on raw bytes


@pytest.mark.parametrize("build", [responses_stream, gemini_stream], ids=["responses", "gemini"])
def test_usage_is_read_even_when_the_answer_text_mentions_usage_null(build):
    s = build(Sent(1000, 500, reasoning=100), ["Here is the code: ", TRAP])
    assert last_usage(s.events) == s.usage
    _, _, usage = Relay(False).run([s.body])
    assert usage == s.usage


# -- end to end, through the real gateway app -----------------------------------------------------------------

class Rig:
    """A fake provider, a gateway on an SQLite file and an HTTP server for its app, on a private event loop
    (hypothesis runs examples one after another in a plain function, so no pytest-tornado loop here)."""

    def __init__(self, tmp_path):
        self.loop = asyncio.new_event_loop()
        self.tmp_path = tmp_path
        self.run(self._start())

    def run(self, coro):
        return self.loop.run_until_complete(coro)

    async def _start(self) -> None:
        self.state = FakeState()
        sock, port = tornado.testing.bind_unused_port()
        self.fake = tornado.httpserver.HTTPServer(make_fake_app(self.state))
        self.fake.add_sockets([sock])
        data = base_config(f"http://127.0.0.1:{port}", f"sqlite:///{self.tmp_path}/fuzz.db")
        data["budget"]["*"] = {"limit": 1e6, "days": 7}
        self.gw = Gateway(build_config(data, ENV), await open_store(data["storage"]["url"]))
        await self.gw.start()
        sock, port = tornado.testing.bind_unused_port()
        self.server = tornado.httpserver.HTTPServer(make_app(self.gw))
        self.server.add_sockets([sock])
        self.base = f"http://127.0.0.1:{port}"
        self.client = AsyncHTTPClient(force_instance=True)

    def close(self) -> None:
        async def stop():
            self.server.stop()
            self.fake.stop()
            self.client.close()
            await self.gw.close()
            await self.gw.store.close()
        self.run(stop())
        self.loop.close()


@pytest.fixture
def slow_only(request):
    if "slow" not in (request.config.getoption("-m") or ""):
        pytest.skip("a few minutes: run with -m slow")


@pytest.fixture
def rig(tmp_path):
    r = Rig(tmp_path)
    yield r
    r.close()


PROMPT = {"contents": [{"role": "user", "parts": [{"text": "Say hello"}]}]}
MESSAGES = [{"role": "user", "content": "Say hello"}]


def request_for(kind: str, asked_for_usage: bool) -> tuple[str, str, dict, str]:
    """(path, provider, body, model priced) of a streamed call of this kind."""
    if kind.startswith("openai"):
        body = {"model": OPENAI_MODEL, "messages": MESSAGES, "stream": True}
        if asked_for_usage:
            body["stream_options"] = {"include_usage": True}
        return "/openai/v1/chat/completions", "openai", body, OPENAI_MODEL
    if kind == "responses":
        return "/openai/v1/responses", "openai", {"model": OPENAI_MODEL, "input": "Say hello", "stream": True}, OPENAI_MODEL
    if kind == "gemini":
        return (f"/geminiv1beta/models/{GEMINI_MODEL}:streamGenerateContent?alt=sse", "gemini",
                {**PROMPT, "stream": True}, GEMINI_MODEL)
    return ("/openrouter/v1/chat/completions", "openrouter",
            {"model": OPENROUTER_MODEL, "messages": MESSAGES, "stream": True}, OPENROUTER_MODEL)


def relay_once(rig: Rig, stream, positions, asked_for_usage: bool) -> None:
    kind, s = stream
    path, provider, body, model = request_for(kind, asked_for_usage)
    rig.state.script = cut(s.body, positions)
    email = f"fuzz-{uuid.uuid4().hex[:10]}@example.com"

    async def go():
        r = await rig.client.fetch(HTTPRequest(
            rig.base + path, method="POST", body=orjson.dumps(body), request_timeout=30,
            headers={"Authorization": f"Bearer {token(email)}", "Content-Type": "application/json"}), raise_error=False)
        await rig.gw.ledger.flush()
        return r, await rig.gw.store.ledger(email, limit=10)

    r, rows = rig.run(go())
    assert r.code == 200, r.body[:300]
    assert r.headers["Access-Control-Allow-Origin"] == "*"
    strip = kind.startswith("openai") and not asked_for_usage
    assert r.body == (s.without_usage_only() if strip else s.body)
    assert len(rows) == 1
    row = rows[0]
    assert (row["provider"], row["status"], bool(row["streamed"]), bool(row["aborted"])) == (provider, 200, True, False)
    assert (row["input_tokens"], row["output_tokens"]) == (s.usage.input_tokens, s.usage.output_tokens)
    assert row["cost"] == pytest.approx(price_of(provider, model, s.usage), abs=1e-9)


E2E = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                      HealthCheck.too_slow])


@E2E
@given(provider_streams(), CUTS, st.booleans())
def test_streams_through_the_gateway_reach_the_client_whole_and_are_billed_what_was_sent(rig, stream, positions,
                                                                                        asked_for_usage):
    relay_once(rig, stream, positions, asked_for_usage)


@pytest.mark.slow
@settings(E2E, max_examples=1000)
@given(provider_streams(), CUTS, st.booleans())
def test_many_streams_through_the_gateway_reach_the_client_whole_and_are_billed_what_was_sent(
        slow_only, rig, stream, positions, asked_for_usage):
    relay_once(rig, stream, positions, asked_for_usage)
