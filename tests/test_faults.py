"""Provider and client faults over the in-process gateway, with the ledger checked after each.

For every fault: the answer is what a client can use (a relayed answer, or JSON `{"message"}` with CORS
headers), the ledger holds exactly the expected charge to 1e-9 USD (nothing for an upstream error, the
reported usage's price, or the estimate for an answer whose usage is unknown), no hold is left behind,
and the gateway goes on serving: the next call through the same provider succeeds and is billed.
Run over SQLite (budgets in memory) and PostgreSQL (admission in the store).
"""
from __future__ import annotations

import asyncio
import math

import orjson
import pytest
import tornado.testing
from tornado.httputil import HTTPHeaders

from aipipe.providers import PROVIDERS
from aipipe.providers.base import Call, streamed_estimate
from aipipe.sse import data_length, split_events
from aipipe.usage import Usage

from .conftest import token
from .fake_upstream import OPENROUTER_MODELS
from .helpers import chat, message
from .soak_support import (
    CHUNKED_END,
    OPENAI_MODEL,
    OPENROUTER_MODEL,
    ScriptedProvider,
    Sent,
    chunked,
    http_head,
    openai_chat,
    openai_usage,
    price_of,
)

CHAT = "/openai/v1/chat/completions"
OR_CHAT = "/openrouter/v1/chat/completions"
OK_SENT = Sent(40, 9)  # what a healthy answer reports


def json_answer(obj, extra: bytes = b"") -> bytes:
    body = orjson.dumps(obj)
    return http_head(ctype="application/json", length=len(body), extra=extra) + body


def chat_answer(s: Sent, model: str = OPENAI_MODEL + "-2024-07-18") -> dict:
    return {"id": "chatcmpl-x", "object": "chat.completion", "created": 1700000000, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi!"}, "finish_reason": "stop"}],
            "usage": openai_usage(s)}


def models_answer(request: bytes) -> list[bytes] | None:
    """OpenRouter's model list, when that is what was asked for."""
    if request.startswith(b"GET ") and b"/v1/models" in request.split(b"\r\n", 1)[0]:
        return [json_answer({"data": OPENROUTER_MODELS})]
    return None


def fault_once(fault) -> callable:
    """A script: the fault (a list of byte strings, or a function of the request giving one) for the first chat
    call, a healthy JSON answer for every call after it, and OpenRouter's model list when asked."""
    calls = []

    def script(request: bytes) -> list[bytes]:
        listed = models_answer(request)
        if listed is not None:
            return listed
        calls.append(request)
        if len(calls) == 1:
            return fault(request) if callable(fault) else fault
        model = OPENROUTER_MODEL if b'"openai/' in request else OPENAI_MODEL + "-2024-07-18"
        return [json_answer(chat_answer(OK_SENT, model))]
    return script


async def gateway_on(make_gateway, serve, provider: ScriptedProvider | None, upstream_timeout: float = 30.0,
                     which: str = "openai"):
    """A gateway whose `which` provider is the scripted one; its base URL."""
    providers = {}
    if provider is not None:
        url = await provider.start()
        providers[which] = {"base_url": url + ("/api" if which == "openrouter" else "")}
    gw = await make_gateway(providers=providers, limits={"upstream_timeout": upstream_timeout},
                            budget={"*": {"limit": 100.0, "days": 7}})
    return gw, serve(gw)


async def charges(gw, email: str) -> list[dict]:
    """The user's ledger rows once every charge made so far is written."""
    await gw.ledger.flush()
    return await gw.store.ledger(email, limit=100)


async def charges_after_the_call_ends(gw, email: str, tries: int = 200) -> list[dict]:
    """charges(), for a call that may still be reading its provider after the client left (bounded wait)."""
    for _ in range(tries):
        rows = await charges(gw, email)
        if rows:
            return rows
        await asyncio.sleep(0.05)
    return []


async def assert_no_hold_left(gw, email: str) -> None:
    await gw.ledger.flush()
    assert await gw.held(email) == pytest.approx(0, abs=1e-12)


async def estimate(gw, provider: str, path: str, body: dict, output_bytes: int) -> float:
    """What the gateway charges a successful answer without usage: the provider's own estimate for the call."""
    headers = HTTPHeaders({"Content-Type": "application/json"})
    call = Call("POST", "/" + path.split("/", 2)[2], "", headers, orjson.dumps(body))
    await PROVIDERS[provider].prepare(call, gw)
    return streamed_estimate(call, output_bytes)


def streamed_bytes(raw: bytes) -> int:
    """The data length the gateway counts for a relayed event stream."""
    return sum(data_length(e) for e in split_events(raw))


async def cut_stream(url: str, body: dict, email: str) -> tuple[int, bytes, BaseException | None]:
    """A streamed call whose answer the gateway is expected to cut: (status, bytes received, the client's error)."""
    from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest

    received: list[bytes] = []
    request = HTTPRequest(url, method="POST", body=orjson.dumps(body), streaming_callback=received.append,
                          headers={"Authorization": f"Bearer {token(email)}", "Content-Type": "application/json"},
                          request_timeout=30)
    try:
        r = await AsyncHTTPClient(force_instance=True).fetch(request, raise_error=False)
        return r.code, b"".join(received), None
    except (OSError, HTTPClientError) as e:
        return 200, b"".join(received), e


def assert_json_error(r, status: int, starts: str = "") -> None:
    assert r.code == status, (r.code, r.body[:200])
    assert r.headers["Content-Type"] == "application/json"
    assert r.headers["Access-Control-Allow-Origin"] == "*"
    assert message(r).startswith(starts)


async def follow_up_succeeds(call, base: str, email: str, path: str = CHAT, model: str = "gpt-4o-mini") -> None:
    r = await call(base + path, "POST", json=chat(model), token=token(email))
    assert r.code == 200, r.body[:300]
    assert orjson.loads(r.body)["choices"][0]["message"]["content"]


# -- the provider cannot be reached, or does not answer -------------------------------------------------------

@pytest.mark.gen_test(timeout=60)
async def test_provider_refusing_connections_is_502_json_and_free(make_gateway, serve, call, store_kind):
    dead_sock, dead_port = tornado.testing.bind_unused_port()
    dead_sock.close()
    gw = await make_gateway(providers={"openai": {"base_url": f"http://127.0.0.1:{dead_port}"}})
    base = serve(gw)
    r = await call(base + CHAT, "POST", json=chat(), token=token("refused@example.com"))
    assert_json_error(r, 502, "Could not reach openai: cannot connect")
    assert await charges(gw, "refused@example.com") == []
    await assert_no_hold_left(gw, "refused@example.com")
    # the same server goes on serving its other providers
    r = await call(base + "/geminiv1beta/models/gemini-2.5-flash:generateContent", "POST",
                   json={"contents": [{"parts": [{"text": "hi"}]}]}, token=token("refused@example.com"))
    assert r.code == 200


@pytest.mark.gen_test(timeout=60)
async def test_provider_hanging_past_the_timeout_is_504_json_and_free(make_gateway, serve, call, store_kind):
    provider = ScriptedProvider(fault_once([]), hang=True)
    try:
        gw, base = await gateway_on(make_gateway, serve, provider, upstream_timeout=0.5)
        r = await call(base + CHAT, "POST", json=chat(), token=token("hang@example.com"))
        assert_json_error(r, 504, "openai did not answer in time")
        assert await charges(gw, "hang@example.com") == []
        await assert_no_hold_left(gw, "hang@example.com")
        gw.upstream_timeout = 30.0  # the same gateway, read per call: 0.5 s was for the hang, not the healthy call
        await follow_up_succeeds(call, base, "hang@example.com")
        rows = await charges(gw, "hang@example.com")
        assert [row["cost"] for row in rows] == [pytest.approx(price_of("openai", OPENAI_MODEL, Usage(40, 9)), abs=1e-9)]
    finally:
        await provider.close()


@pytest.mark.gen_test(timeout=60)
async def test_stream_hanging_past_the_timeout_is_cut_and_billed_the_estimate(make_gateway, serve, call, store_kind):
    s = openai_chat(Sent(500, 300), ["Once", " upon", " a time"])
    sent = s.events[:3]  # role chunk and two words: no usage
    provider = ScriptedProvider(fault_once([http_head()] + [chunked(e) for e in sent]), hang=True)
    try:
        gw, base = await gateway_on(make_gateway, serve, provider, upstream_timeout=0.5)
        body = chat(stream=True)
        code, received, error = await cut_stream(base + CHAT, body, "slowstream@example.com")
        assert code == 200 and received == b"".join(sent) and error is not None  # the client sees the cut
        rows = await charges(gw, "slowstream@example.com")
        assert len(rows) == 1 and rows[0]["streamed"]
        expected = await estimate(gw, "openai", CHAT, body, streamed_bytes(b"".join(sent)))
        assert rows[0]["cost"] == pytest.approx(expected, abs=1e-9) and expected > 0
        await assert_no_hold_left(gw, "slowstream@example.com")
        gw.upstream_timeout = 30.0  # the same gateway, read per call: 0.5 s was for the hang, not the healthy call
        await follow_up_succeeds(call, base, "slowstream@example.com")
    finally:
        await provider.close()


# -- the provider breaks off mid-answer -----------------------------------------------------------------------

@pytest.mark.gen_test(timeout=60)
async def test_stream_dropped_before_usage_is_billed_the_estimate(make_gateway, serve, call, store_kind):
    s = openai_chat(Sent(500, 300), ["Once", " upon", " a time"])
    sent = s.events[:4]
    provider = ScriptedProvider(fault_once([http_head()] + [chunked(e) for e in sent]))  # then closed, unfinished
    try:
        gw, base = await gateway_on(make_gateway, serve, provider)
        body = chat(stream=True)
        code, received, error = await cut_stream(base + CHAT, body, "drop1@example.com")
        assert code == 200 and received == b"".join(sent) and error is not None  # the client sees the cut
        rows = await charges(gw, "drop1@example.com")
        expected = await estimate(gw, "openai", CHAT, body, streamed_bytes(b"".join(sent)))
        assert [row["cost"] for row in rows] == [pytest.approx(expected, abs=1e-9)]
        await assert_no_hold_left(gw, "drop1@example.com")
        await follow_up_succeeds(call, base, "drop1@example.com")
    finally:
        await provider.close()


@pytest.mark.gen_test(timeout=60)
async def test_stream_dropped_after_its_usage_is_billed_that_usage(make_gateway, serve, call, store_kind):
    s = openai_chat(Sent(1500, 700, cached=1024), ["Once", " upon", " a time"])
    sent = s.events[:-1]  # everything but [DONE], the usage-only chunk included
    provider = ScriptedProvider(fault_once([http_head()] + [chunked(e) for e in sent]))
    try:
        gw, base = await gateway_on(make_gateway, serve, provider)
        code, received, error = await cut_stream(base + CHAT, chat(stream=True), "drop2@example.com")
        assert code == 200 and received == b"".join(e for i, e in enumerate(sent) if i != s.usage_only)
        assert error is not None  # no [DONE] came: the client sees the cut
        rows = await charges(gw, "drop2@example.com")
        assert [row["cost"] for row in rows] == [pytest.approx(price_of("openai", OPENAI_MODEL, s.usage), abs=1e-9)]
        assert (rows[0]["input_tokens"], rows[0]["output_tokens"]) == (1500, 700)
        await follow_up_succeeds(call, base, "drop2@example.com")
    finally:
        await provider.close()


def truncated_json() -> tuple[list[bytes], bytes]:
    body = orjson.dumps(chat_answer(Sent(100_000, 20_000)))
    half = body[: len(body) // 2]
    return [http_head(ctype="application/json", length=len(body)), half], half


@pytest.mark.gen_test(timeout=60)
async def test_json_answer_cut_short_is_502_json_not_a_200_with_invalid_json(make_gateway, serve, call, store_kind):
    pieces, _ = truncated_json()
    provider = ScriptedProvider(fault_once(pieces))
    try:
        gw, base = await gateway_on(make_gateway, serve, provider)
        r = await call(base + CHAT, "POST", json=chat(), token=token("cut@example.com"))
        assert_json_error(r, 502, "openai ")  # not a 200 carrying half a JSON answer
    finally:
        await provider.close()


@pytest.mark.gen_test(timeout=60)
async def test_json_answer_cut_short_is_billed_the_estimate(make_gateway, serve, call, store_kind):
    pieces, half = truncated_json()
    provider = ScriptedProvider(fault_once(pieces))
    try:
        gw, base = await gateway_on(make_gateway, serve, provider)
        await call(base + CHAT, "POST", json=chat(), token=token("cut2@example.com"))
        rows = await charges(gw, "cut2@example.com")
        expected = await estimate(gw, "openai", CHAT, chat(), len(half))
        assert [row["cost"] for row in rows] == [pytest.approx(expected, abs=1e-9)]
        await assert_no_hold_left(gw, "cut2@example.com")
        await follow_up_succeeds(call, base, "cut2@example.com")
    finally:
        await provider.close()


# -- the provider sends something odd -------------------------------------------------------------------------

GARBAGE = bytes((i * 167 + 13) % 256 for i in range(5000)) + b"\ndata: not json\n\n\x00\xff data:x"


@pytest.mark.gen_test(timeout=60)
@pytest.mark.parametrize("asked_for_usage", [False, True], ids=["gateway-asked-usage", "client-asked-usage"])
async def test_garbage_event_stream_is_relayed_and_billed_the_estimate(make_gateway, serve, call, store_kind,
                                                                       asked_for_usage):
    provider = ScriptedProvider(fault_once([http_head()] + [chunked(GARBAGE[i:i + 777])
                                                            for i in range(0, len(GARBAGE), 777)] + [CHUNKED_END]))
    try:
        gw, base = await gateway_on(make_gateway, serve, provider)
        body = chat(stream=True, **({"stream_options": {"include_usage": True}} if asked_for_usage else {}))
        r = await call(base + CHAT, "POST", json=body, token=token("garbage@example.com"))
        assert r.code == 200 and r.body == GARBAGE
        rows = await charges(gw, "garbage@example.com")
        expected = await estimate(gw, "openai", CHAT, body, streamed_bytes(GARBAGE))
        assert [row["cost"] for row in rows] == [pytest.approx(expected, abs=1e-9)]
        await follow_up_succeeds(call, base, "garbage@example.com")
    finally:
        await provider.close()


HUGE = 6 * 1024 * 1024


@pytest.mark.gen_test(timeout=120)
@pytest.mark.parametrize("ends", ["unterminated", "with-usage"])
async def test_a_huge_single_event_is_relayed_and_billed(make_gateway, serve, call, store_kind, ends):
    if ends == "unterminated":  # several MB of one event, no newline, and the stream ends
        event = b"data: " + b"x" * HUGE
        expected_usage = None
    else:  # one event of several MB that carries the usage
        s = Sent(2000, 1000)
        event = (b'data: {"id":"c","object":"chat.completion.chunk","model":"gpt-4o-mini","choices":[],"pad":"'
                 + b"y" * HUGE + b'","usage":' + orjson.dumps(openai_usage(s)) + b"}\n\n")
        expected_usage = Usage(2000, 1000)
    provider = ScriptedProvider(fault_once([http_head()] + [chunked(event[i:i + 65536])
                                                            for i in range(0, len(event), 65536)] + [CHUNKED_END]),
                                pause=0)
    try:
        gw, base = await gateway_on(make_gateway, serve, provider)
        body = chat(stream=True, stream_options={"include_usage": True})
        r = await call(base + CHAT, "POST", json=body, token=token("huge@example.com"))
        assert r.code == 200 and r.body == event
        rows = await charges(gw, "huge@example.com")
        if expected_usage is None:
            expected = await estimate(gw, "openai", CHAT, body, streamed_bytes(event))
        else:
            expected = price_of("openai", OPENAI_MODEL, expected_usage)
        assert [row["cost"] for row in rows] == [pytest.approx(expected, abs=1e-9)]
        await follow_up_succeeds(call, base, "huge@example.com")
    finally:
        await provider.close()


def openrouter_json(cost_text: bytes, prompt: int = 100_000, completion: int = 20_000) -> bytes:
    """OpenRouter's JSON answer with usage.cost written as given (NaN and Infinity as Python's json writes them)."""
    body = (b'{"id":"gen-1","provider":"OpenAI","model":"openai/gpt-4o-mini","object":"chat.completion",'
            b'"choices":[{"index":0,"message":{"role":"assistant","content":"Hi"},"finish_reason":"stop"}],'
            b'"usage":{"prompt_tokens":%d,"completion_tokens":%d,"total_tokens":%d,"cost":%s}}'
            % (prompt, completion, prompt + completion, cost_text))
    return http_head(ctype="application/json", length=len(body)) + body


def openrouter_sse(cost_text: bytes, prompt: int = 100_000, completion: int = 20_000) -> list[bytes]:
    events = [b": OPENROUTER PROCESSING\n\n",
              b'data: {"id":"gen-1","model":"openai/gpt-4o-mini","object":"chat.completion.chunk",'
              b'"choices":[{"index":0,"delta":{"content":"Hi"},"finish_reason":null}]}\n\n',
              b'data: {"id":"gen-1","model":"openai/gpt-4o-mini","object":"chat.completion.chunk","choices":[],'
              b'"usage":{"prompt_tokens":%d,"completion_tokens":%d,"total_tokens":%d,"cost":%s}}\n\n'
              % (prompt, completion, prompt + completion, cost_text),
              b"data: [DONE]\n\n"]
    return [http_head()] + [chunked(e) for e in events] + [CHUNKED_END]


COSTS = {"negative": b"-0.5", "small-negative": b"-1e-3", "nan": b"NaN", "infinity": b"Infinity",
         "minus-infinity": b"-Infinity", "overflow": b"-1e999"}
NOT_JSON = ("nan", "infinity", "minus-infinity", "overflow")  # orjson refuses these (Python's json.dumps writes them)


def odd_cost_cases():
    for name, text in COSTS.items():
        for form in ("json", "sse"):
            yield pytest.param(name, text, form, id=f"{name}-{form}")


@pytest.mark.gen_test(timeout=60)
@pytest.mark.parametrize("name,cost_text,form", list(odd_cost_cases()))
async def test_openrouter_odd_cost_never_lowers_spend_below_the_token_price(make_gateway, serve, call, store_kind,
                                                                            name, cost_text, form):
    answer = openrouter_json(cost_text) if form == "json" else openrouter_sse(cost_text)
    provider = ScriptedProvider(fault_once([answer] if form == "json" else answer))
    try:
        gw, base = await gateway_on(make_gateway, serve, provider, which="openrouter")
        email = f"oddcost-{name}-{form}@example.com"
        r = await call(base + OR_CHAT, "POST", json=chat(OPENROUTER_MODEL, stream=form == "sse"), token=token(email))
        assert r.code == 200
        rows = await charges(gw, email)
        tokens_price = price_of("openrouter", OPENROUTER_MODEL, Usage(100_000, 20_000))
        assert len(rows) == 1 and math.isfinite(rows[0]["cost"])
        assert rows[0]["cost"] == pytest.approx(tokens_price, abs=1e-9)
        await follow_up_succeeds(call, base, email, OR_CHAT, OPENROUTER_MODEL)
    finally:
        await provider.close()


@pytest.mark.gen_test(timeout=60)
async def test_openrouter_sane_cost_is_what_is_charged(make_gateway, serve, call, store_kind):
    """The control for the odd costs above: a plain cost is charged as reported."""
    provider = ScriptedProvider(fault_once([openrouter_json(b"0.0421")]))
    try:
        gw, base = await gateway_on(make_gateway, serve, provider, which="openrouter")
        r = await call(base + OR_CHAT, "POST", json=chat(OPENROUTER_MODEL), token=token("sanecost@example.com"))
        assert r.code == 200 and float(r.headers["X-AIPipe-Cost"]) == pytest.approx(0.0421, abs=1e-9)
        rows = await charges(gw, "sanecost@example.com")
        assert [row["cost"] for row in rows] == [pytest.approx(0.0421, abs=1e-9)]
    finally:
        await provider.close()


@pytest.mark.gen_test(timeout=60)
async def test_provider_header_with_a_control_character_is_dropped_and_the_answer_billed(make_gateway, serve, call,
                                                                                          store_kind):
    s = Sent(3000, 400)
    provider = ScriptedProvider(fault_once([json_answer(chat_answer(s), extra=b"X-Odd: a\x01b\r\n")]))
    try:
        gw, base = await gateway_on(make_gateway, serve, provider)
        r = await call(base + CHAT, "POST", json=chat(), token=token("ctl@example.com"))
        rows = await charges(gw, "ctl@example.com")
        assert [row["cost"] for row in rows] == [pytest.approx(price_of("openai", OPENAI_MODEL, Usage(3000, 400)),
                                                               abs=1e-9)]
        assert r.code == 200 and "X-Odd" not in r.headers
        assert orjson.loads(r.body)["usage"]["prompt_tokens"] == 3000
    finally:
        await provider.close()


@pytest.mark.gen_test(timeout=60)
async def test_a_call_answered_with_a_gateway_error_is_not_billed(make_gateway, serve, call, store_kind):
    provider = ScriptedProvider(fault_once([json_answer(chat_answer(Sent(3000, 400)), extra=b"X-Odd: a\x01b\r\n")]))
    try:
        gw, base = await gateway_on(make_gateway, serve, provider)
        r = await call(base + CHAT, "POST", json=chat(), token=token("ctl2@example.com"))
        rows = await charges(gw, "ctl2@example.com")
        assert r.code < 500 or sum(row["cost"] for row in rows) == 0, (r.code, rows)
    finally:
        await provider.close()


# -- the client leaves ----------------------------------------------------------------------------------------

@pytest.mark.gen_test(timeout=60)
@pytest.mark.parametrize("provider_name", ["openai", "openrouter", "gemini"])
async def test_client_aborting_mid_stream_is_still_billed_the_reported_usage(make_gateway, serve, call, upstream,
                                                                             store_kind, provider_name):
    upstream.state.event_delay, upstream.state.events = 0.05, 12
    upstream.state.split = 7 if provider_name == "gemini" else 0  # Gemini's fake paces its stream by its writes
    upstream.state.prompt_tokens, upstream.state.completion_tokens = 2345, 678
    gw = await make_gateway()
    base = serve(gw)
    email = f"abort-{provider_name}@example.com"
    path, body, model = {
        "openai": (CHAT, chat(stream=True), OPENAI_MODEL),
        "openrouter": (OR_CHAT, chat(OPENROUTER_MODEL, stream=True), OPENROUTER_MODEL),
        "gemini": ("/geminiv1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse",
                   {"contents": [{"parts": [{"text": "hi"}]}]}, "gemini-2.5-flash"),
    }[provider_name]
    reader, writer = await asyncio.open_connection("127.0.0.1", int(base.rsplit(":", 1)[1]))
    payload = orjson.dumps(body)
    writer.write(b"POST " + path.encode() + b" HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + token(email).encode()
                 + b"\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(payload) + payload)
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert head.startswith(b"HTTP/1.1 200")
    assert await asyncio.wait_for(reader.read(64), 10)  # the stream has started
    writer.close()  # and the client leaves
    rows = await charges_after_the_call_ends(gw, email)
    if provider_name == "openrouter":
        expected = upstream.state.openrouter_cost
    else:
        expected = price_of(provider_name, model, Usage(2345, 678))
    assert [row["cost"] for row in rows] == [pytest.approx(expected, abs=1e-9)]
    assert rows[0]["aborted"] and rows[0]["streamed"]
    await assert_no_hold_left(gw, email)
    upstream.state.event_delay = 0
    r = await call(base + path, "POST", json=body, token=token(email))
    assert r.code == 200


# -- a kept-alive connection the provider resets as it is reused ----------------------------------------------

async def resetting_provider():
    """A provider that keeps its connection open after an answer, then resets it (RST, as a provider closing an idle
    connection does when a request is already on its way) when a second request arrives on it."""
    import socket
    import struct

    received: list[bytes] = []  # request lines the provider read whole

    async def handle(reader, writer):
        served = 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                await reader.readexactly(length)
                received.append(head.split(b"\r\n", 1)[0])
                if served:
                    sock = writer.get_extra_info("socket")
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    writer.transport.abort()
                    return
                served += 1
                body = orjson.dumps(chat_answer(OK_SENT))
                writer.write(http_head(ctype="application/json", length=len(body)).replace(
                    b"Connection: close\r\n", b"") + body)
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    server.received = received
    return server


@pytest.mark.gen_test(timeout=60)
async def test_a_request_the_provider_took_whole_and_then_reset_is_not_sent_twice(make_gateway, serve, call):
    server = await resetting_provider()
    try:
        port = server.sockets[0].getsockname()[1]
        gw = await make_gateway(providers={"openai": {"base_url": f"http://127.0.0.1:{port}"}})
        base = serve(gw)
        first = await call(base + CHAT, "POST", json=chat(), token=token("reset@example.com"))
        assert first.code == 200, first.body
        second = await call(base + CHAT, "POST", json=chat(), token=token("reset@example.com"))
        # the provider had the whole request when it reset: it may have started on it, so it is not run again
        assert_json_error(second, 502, "Could not reach openai: the connection failed")
        assert len(server.received) == 2
        rows = await charges(gw, "reset@example.com")
        assert [row["cost"] for row in rows] == [pytest.approx(price_of("openai", OPENAI_MODEL, Usage(40, 9)),
                                                               abs=1e-9)]
        third = await call(base + CHAT, "POST", json=chat(), token=token("reset@example.com"))
        assert third.code == 200  # a fresh connection serves the next call
    finally:
        server.close()


@pytest.mark.gen_test(timeout=60)
@pytest.mark.parametrize("count", [b"1" + b"0" * 400, b"1e308", b"9007199254740993"])
async def test_usage_counts_no_price_can_use_are_billed_the_calls_hold_not_nothing(make_gateway, serve, call,
                                                                                   store_kind, count):
    body = (b'{"id":"c","object":"chat.completion","model":"gpt-4o-mini","choices":[],'
            b'"usage":{"prompt_tokens":' + count + b',"completion_tokens":1},"x":NaN}')
    provider = ScriptedProvider(fault_once([http_head(ctype="application/json", length=len(body)) + body]))
    try:
        gw, base = await gateway_on(make_gateway, serve, provider)
        request = chat()
        r = await call(base + CHAT, "POST", json=request, token=token("huge@example.com"))
        assert r.code == 200 and r.body == body
        rows = await charges(gw, "huge@example.com")
        call_ = Call("POST", "/v1/chat/completions", "", HTTPHeaders({"Content-Type": "application/json"}),
                     orjson.dumps(request))
        await PROVIDERS["openai"].prepare(call_, gw)
        billed = float(r.headers["X-AIPipe-Cost"])
        assert [row["cost"] for row in rows] == [pytest.approx(billed, abs=1e-9)]
        assert billed == pytest.approx(call_.hold, abs=1e-9) and billed > 0  # the most the call could cost
        await follow_up_succeeds(call, base, "huge@example.com")
    finally:
        await provider.close()
