"""Attacks on the provider routes, pinned: what an attacker or a careless provider could try against billing, model
rules and credentials, and what the gateway answers (to 1e-9 USD, over every store and admission)."""
from __future__ import annotations

import asyncio

import orjson
import pytest
import tornado.httpserver
import tornado.testing
import tornado.web

from .conftest import ENV, token
from .helpers import chat, message, raw_request, settled, spent

pytestmark = pytest.mark.every_gateway  # over each store and admission (conftest.GATEWAY_MODES)

OPUS = "claude-opus-4-1"  # $15 / $75 per million; cache reads $1.50, writes $18.75 (5 min) and $30 (1 h)
SONNET = "claude-sonnet-4-5"  # $3 / $15 per million
STUDENT = "ada@students.example.edu"
RULES = {"@students.example.edu": {"limit": 2, "days": 7,
                                   "models": ["gpt-4o-mini", "claude-haiku-*", "gemini-*-flash*", "text-embedding-3-*",
                                              "openai/gpt-4o-mini"]}}


def opus_cost(fresh: int, output: int, read: int = 0, write_5m: int = 0, write_1h: int = 0) -> float:
    return (fresh * 15 + read * 1.5 + write_5m * 18.75 + write_1h * 30 + output * 75) / 1e6


def sonnet_cost(fresh: int, output: int) -> float:
    return (fresh * 3 + output * 15) / 1e6


def messages_body(model: str = SONNET, stream: bool = False, **extra) -> dict:
    body = {"model": model, "max_tokens": 100, "messages": [{"role": "user", "content": "Say hello"}], **extra}
    return {**body, "stream": True} if stream else body


# A provider that answers exactly the bytes a test gives it, for usage figures the shared fakes never send.
class Script:
    """What the scripted provider answers next, and what it was sent."""

    def __init__(self) -> None:
        self.pieces: list[bytes] = []  # written and flushed one by one
        self.content_type = "text/event-stream"
        self.requests: list[dict] = []
        self.url = ""


class ScriptedHandler(tornado.web.RequestHandler):
    def initialize(self, script: Script) -> None:
        self.script = script

    async def post(self) -> None:
        script = self.script
        script.requests.append({"path": self.request.path, "headers": dict(self.request.headers.get_all())})
        self.set_header("Content-Type", script.content_type)
        for piece in script.pieces:
            self.write(piece)
            await self.flush()
        self.finish()


@pytest.fixture
def script(io_loop):
    s = Script()
    sock, port = tornado.testing.bind_unused_port()
    server = tornado.httpserver.HTTPServer(tornado.web.Application([(r"/.*", ScriptedHandler, {"script": s})]))
    server.add_sockets([sock])
    s.url = f"http://127.0.0.1:{port}"
    yield s
    server.stop()


def event(name: str, data: bytes | dict) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + (data if isinstance(data, bytes) else orjson.dumps(data)) + b"\n\n"


def message_start(**usage) -> bytes:
    return event("message_start", {"type": "message_start", "message": {
        "id": "msg_1", "type": "message", "role": "assistant", "model": OPUS, "content": [], "usage": usage}})


def text_delta(text: str) -> bytes:
    return event("content_block_delta", {"type": "content_block_delta", "index": 0,
                                         "delta": {"type": "text_delta", "text": text}})


def message_delta(usage: bytes | dict) -> bytes:
    usage = usage if isinstance(usage, bytes) else orjson.dumps(usage)
    return event("message_delta", b'{"type":"message_delta","delta":{"stop_reason":"end_turn"},"usage":' + usage + b"}")


MESSAGE_STOP = event("message_stop", {"type": "message_stop"})


@pytest.mark.gen_test
async def test_the_callers_token_never_goes_upstream_whichever_header_carries_it(gateway, upstream, call):
    t = token("carrier@example.com")
    # /openai reads Authorization only: a token in x-api-key alone is no token there, and nothing is sent
    r = await call("/openai/v1/chat/completions", "POST", json=chat(), headers={"x-api-key": t})
    assert r.code == 401 and upstream.state.requests == []
    sends = [
        ("/openai/v1/chat/completions", chat(), {"Authorization": f"Bearer {t}", "x-api-key": t, "x-goog-api-key": t}),
        ("/openrouter/v1/chat/completions", chat("openai/gpt-4o-mini"), {"Authorization": f"Bearer {t}", "x-api-key": t}),
        ("/anthropic/v1/messages", messages_body(), {"Authorization": f"Bearer {t}", "x-goog-api-key": t}),
        ("/anthropic/v1/messages", messages_body(), {"x-api-key": t, "Proxy-Authorization": t, "Cookie": f"t={t}"}),
        ("/anthropic/v1/messages/count_tokens", {"model": SONNET, "messages": []}, {"x-api-key": t}),
        ("/geminiv1beta/models/gemini-2.5-flash:generateContent?alt=json", {"contents": []},
         {"Authorization": f"Bearer {t}", "x-api-key": t}),
    ]
    for path, body, headers in sends:
        r = await call(path, "POST", json=body, headers=headers)
        assert r.code == 200, (path, r.body)
        assert t not in r.body.decode() and all(t not in v for v in r.headers.values())
    for sent in upstream.state.requests:
        if sent["path"] == "/api/v1/models":  # OpenRouter's price list
            continue
        assert all(t not in value for value in sent["headers"].values()), sent["path"]
        assert t not in sent["query"] and t.encode() not in sent["body"]
    keys = {r["provider"]: r["headers"] for r in upstream.state.requests if r["path"] != "/api/v1/models"}
    assert keys["openai"]["Authorization"] == f"Bearer {ENV['OPENAI_API_KEY']}" and "X-Api-Key" not in keys["openai"]
    assert keys["anthropic"]["X-Api-Key"] == ENV["ANTHROPIC_API_KEY"] and "Authorization" not in keys["anthropic"]
    assert keys["gemini"]["X-Goog-Api-Key"] == ENV["GEMINI_API_KEY"] and "Authorization" not in keys["gemini"]


@pytest.mark.gen_test
async def test_refusals_never_quote_the_token_or_the_operator_key(make_gateway, serve, call, upstream):
    url = serve(await make_gateway(budget=RULES))
    for email, path, body in [
        (STUDENT, "/anthropic/v1/messages", messages_body(OPUS)),  # 403: model rule
        (STUDENT, "/anthropic/v1/messages/batches", {"requests": []}),  # 400: batches
        ("blocked@example.com", "/anthropic/v1/messages", messages_body()),  # 429: no budget
        ("someone@example.com", "/anthropic/v1/nope", messages_body()),  # 400: endpoint
    ]:
        t = token(email)
        r = await call(url + path, "POST", json=body, headers={"x-api-key": t})
        assert r.code in (400, 403, 429), (path, r.code)
        text = r.body.decode() + "".join(r.headers.values())
        assert t not in text and ENV["ANTHROPIC_API_KEY"] not in text
    bad = await call(url + "/anthropic/v1/messages", "POST", json=messages_body(), headers={"x-api-key": "eyJ.not.a.token"})
    assert bad.code == 401 and "eyJ.not.a.token" not in bad.body.decode()
    assert upstream.state.requests == []


@pytest.mark.gen_test
@pytest.mark.parametrize("target", [
    "/anthropic/v1/messages/", "/anthropic/V1/messages", "/anthropic/v1/Messages", "/anthropic/v1/messages/count_tokens/",
    "/anthropic/v1/messages/batches/", "/anthropic/v1/messages/batches/msgbatch_1/results", "/anthropic/v1/complete",
    "/anthropic/v1//messages", "/anthropic/v1/x/../messages", "/anthropic/v1/./messages", "/anthropic/v1/messages%2F",
    "/anthropic/v1/messages;x=1", "/anthropic/v1/messages/count_tokens/../../messages",
])
async def test_spellings_of_the_messages_path_are_refused_before_upstream(target, gateway, upstream, http_server,
                                                                          base_url):
    status, _, body = await raw_request(base_url, "POST", target,
                                        {"x-api-key": token("spell@example.com"), "Content-Type": "application/json"},
                                        orjson.dumps(messages_body(OPUS)))
    assert status == 400, (target, body)
    assert upstream.state.requests == []
    assert await spent(gateway, "spell@example.com") == 0


@pytest.mark.gen_test
async def test_a_query_string_or_another_method_does_not_make_a_message_cheaper(make_gateway, serve, call, upstream):
    url = serve(await make_gateway(budget=RULES))
    t = {"x-api-key": token("query@example.com")}
    plain = await call(url + "/anthropic/v1/messages", "POST", json=messages_body(), headers=t)
    queried = await call(url + "/anthropic/v1/messages?beta=true&stream=false", "POST", json=messages_body(), headers=t)
    assert plain.code == queried.code == 200
    assert plain.headers["X-AIPipe-Cost"] == queried.headers["X-AIPipe-Cost"]
    assert upstream.state.last["query"] == "beta=true&stream=false"
    sent = len(upstream.state.requests)
    for method in ("PUT", "PATCH"):  # priced and held to the rules like a POST: not a way round them
        r = await call(url + "/anthropic/v1/messages", method, json=messages_body(OPUS), token=token(STUDENT))
        assert r.code == 403 and message(r) == f"Model {OPUS} is not allowed for you"
    assert len(upstream.state.requests) == sent


@pytest.mark.gen_test
async def test_model_spellings_cannot_slip_past_a_rule(make_gateway, serve, call, upstream):
    gw = await make_gateway(budget=RULES)
    url = serve(gw)
    t = token(STUDENT)
    refused_403 = [
        ("/anthropic/v1/messages", messages_body("claude-opus-4-1-20250805")),  # a dated id of a forbidden model
        ("/anthropic/v1/messages", messages_body("models/claude-opus-4-1")),  # priced as claude-opus-4-1
        ("/anthropic/v1/messages/count_tokens", {"model": "claude-sonnet-4-5", "messages": []}),
        ("/openrouter/v1/chat/completions", chat("anthropic/claude-sonnet-4:nitro")),  # priced as its base model
        ("/openai/v1/chat/completions", chat("gpt-4o")),
        ("/openai/v1/embeddings", {"model": "text-embedding-ada-002", "input": "x"}),
        ("/geminiv1beta/models/gemini-2.5-pro:streamGenerateContent", {"contents": []}),
        ("/geminiv1beta/models/gemini-2.5-pro:countTokens", {"contents": []}),
        ("/geminiv1beta/models/gemini-embedding-001:batchEmbedContents", {"requests": []}),
    ]
    for path, body in refused_403:
        r = await call(url + path, "POST", json=body, headers={"x-api-key": t} if "anthropic" in path else None,
                       token=None if "anthropic" in path else t)
        assert r.code == 403 and message(r).endswith("is not allowed for you"), (path, r.code, r.body)
    r = await call(url + "/similarity", "POST", json={"docs": ["a"], "model": "text-embedding-ada-002"},
                   headers={"x-api-key": t})  # /similarity takes the token in any provider's header
    assert r.code == 403
    # other cases of a forbidden model are refused too, for want of a price (prices are looked up as spelt)
    for path, body, name in [("/anthropic/v1/messages", messages_body("CLAUDE-OPUS-4-1"), "CLAUDE-OPUS-4-1"),
                             ("/openrouter/v1/chat/completions", chat("Anthropic/Claude-Sonnet-4"), "Anthropic/Claude-Sonnet-4"),
                             ("/geminiv1beta/models/Gemini-2.5-Pro:generateContent", {"contents": []}, "Gemini-2.5-Pro")]:
        r = await call(url + path, "POST", json=body, token=t)
        assert r.code == 400 and message(r) == f"Model {name} pricing unknown", (path, r.body)
    assert [s["path"] for s in upstream.state.requests] == ["/api/v1/models"]  # only OpenRouter's price list
    allowed = await call(url + "/anthropic/v1/messages", "POST", json=messages_body("claude-haiku-4-5-20251001"),
                         headers={"x-api-key": t})
    assert allowed.code == 200
    await settled(gw)
    rows = await gw.store.ledger(STUDENT)
    assert [r["model"] for r in rows] == ["claude-haiku-4-5-20251001"]
    assert await gw.held(STUDENT) == 0  # the refusals left no hold behind


@pytest.mark.gen_test
async def test_later_stream_events_cannot_lower_what_earlier_ones_reported(make_gateway, serve, call, script):
    gw = await make_gateway(providers={"anthropic": {"base_url": script.url}})
    url = serve(gw)
    script.pieces = [
        message_start(input_tokens=5000, cache_read_input_tokens=1000, output_tokens=1),
        text_delta("hello"),
        message_delta({"input_tokens": 10, "cache_read_input_tokens": 0, "output_tokens": 300}),
        message_delta(b'{"input_tokens":-5000,"cache_read_input_tokens":NaN,"output_tokens":-1e308}'),
        message_delta({"input_tokens": "9999999", "output_tokens": 2.5, "cache_read_input_tokens": None}),
        MESSAGE_STOP,
    ]
    r = await call(url + "/anthropic/v1/messages", "POST", json=messages_body(OPUS, stream=True),
                   headers={"x-api-key": token("lower@example.com")})
    assert r.code == 200 and r.body.endswith(MESSAGE_STOP)
    assert await spent(gw, "lower@example.com") == pytest.approx(opus_cost(5000, 300, read=1000), abs=1e-9)
    rows = await gw.store.ledger("lower@example.com")
    assert len(rows) == 1 and rows[0]["input_tokens"] == 6000 and rows[0]["output_tokens"] == 300


@pytest.mark.gen_test
@pytest.mark.parametrize("usage", [
    b'{"input_tokens":12,"output_tokens":1152921504606846976}',  # 2**60
    b'{"input_tokens":1e300,"output_tokens":7}',
    b'{"input_tokens":12,"cache_read_input_tokens":Infinity,"output_tokens":7}',
])
async def test_counts_no_answer_could_have_bill_the_hold_never_less(usage, make_gateway, serve, call, script):
    gw = await make_gateway(providers={"anthropic": {"base_url": script.url}})
    url = serve(gw)
    script.content_type = "application/json"
    script.pieces = [b'{"type":"message","role":"assistant","content":[],"usage":' + usage + b"}"]
    body = orjson.dumps(messages_body(OPUS))
    r = await call(url + "/anthropic/v1/messages", "POST", body=body,
                   headers={"x-api-key": token("absurd@example.com"), "Content-Type": "application/json"})
    assert r.code == 200
    hold = (len(body) * 30 + 100 * 75) / 1e6  # a byte a token at the dearest input rate (1-hour cache writes), max_tokens
    assert float(r.headers["X-AIPipe-Cost"]) == pytest.approx(hold, abs=1e-9)
    assert await spent(gw, "absurd@example.com") == pytest.approx(hold, abs=1e-9)


@pytest.mark.gen_test
async def test_a_stream_whose_usage_arrives_split_across_reads_is_billed_once_in_full(make_gateway, serve, call, script):
    gw = await make_gateway(providers={"anthropic": {"base_url": script.url}})
    url = serve(gw)
    whole = (message_start(input_tokens=800, cache_creation_input_tokens=200, output_tokens=1,
                           cache_creation={"ephemeral_5m_input_tokens": 200, "ephemeral_1h_input_tokens": 0})
             + text_delta("a usage-shaped text: \"usage\":{\"output_tokens\":1}") + message_delta(
                 {"output_tokens": 40}) + MESSAGE_STOP).replace(b"\n", b"\r\n")
    script.pieces = [whole[i:i + 7] for i in range(0, len(whole), 7)]  # every event cut across network writes
    r = await call(url + "/anthropic/v1/messages", "POST", json=messages_body(OPUS, stream=True),
                   headers={"x-api-key": token("split@example.com")})
    assert r.code == 200 and r.body == whole
    assert await spent(gw, "split@example.com") == pytest.approx(opus_cost(800, 40, write_5m=200), abs=1e-9)


@pytest.mark.gen_test
async def test_a_budget_is_not_passed_by_a_large_prompt_sent_as_json(make_gateway, serve, call, upstream):
    url = serve(await make_gateway(budget={"tight@example.com": {"limit": 0.05, "days": 1}}))
    body = orjson.dumps(messages_body(OPUS, max_tokens=1, messages=[{"role": "user", "content": "x" * 200_000}]))
    for content_type in ("application/json", "application/json; charset=utf-8", "text/plain"):
        r = await call(url + "/anthropic/v1/messages", "POST", body=body,
                       headers={"x-api-key": token("tight@example.com"), "Content-Type": content_type})
        assert r.code in (400, 429), (content_type, r.code)  # text/plain names no model it can read: 400
    assert upstream.state.requests == []


@pytest.mark.gen_test
async def test_parallel_calls_are_each_billed_once_and_leave_no_hold(gateway, upstream, call):
    upstream.state.cached_tokens, upstream.state.cache_write_tokens, upstream.state.cache_write_1h_tokens = 30, 20, 10
    t = {"x-api-key": token("many@example.com")}
    answers = await asyncio.gather(*(
        call("/anthropic/v1/messages", "POST", json=messages_body(OPUS, stream=i % 2 == 0), headers=t)
        for i in range(8)))
    assert [a.code for a in answers] == [200] * 8
    await settled(gateway)
    rows = await gateway.store.ledger("many@example.com")
    one = opus_cost(12, 7, read=30, write_5m=20, write_1h=10)
    assert len(rows) == 8 and all(r["cost"] == pytest.approx(one, abs=1e-12) for r in rows)
    assert await spent(gateway, "many@example.com") == pytest.approx(8 * one, abs=1e-9)
    assert await gateway.held("many@example.com") == 0


@pytest.mark.gen_test
async def test_free_calls_leave_no_row_and_no_hold(gateway, upstream, call):
    t = {"x-api-key": token("free@example.com")}
    counted = await call("/anthropic/v1/messages/count_tokens", "POST", json={"model": OPUS, "messages": []}, headers=t)
    models = await call("/anthropic/v1/models", headers=t)
    assert counted.code == models.code == 200 and "X-AIPipe-Cost" not in counted.headers
    await settled(gateway)
    assert await gateway.store.ledger("free@example.com") == []
    assert await gateway.held("free@example.com") == 0


@pytest.mark.gen_test
async def test_charges_made_before_a_shutdown_are_all_written(gateway, upstream, call):
    t = {"x-api-key": token("closing@example.com")}
    for stream in (False, True, False):
        r = await call("/anthropic/v1/messages", "POST", json=messages_body(stream=stream), headers=t)
        assert r.code == 200
    await gateway.ledger.close()  # what a shutdown does after the calls ended: write every queued charge
    rows = await gateway.store.ledger("closing@example.com")
    assert len(rows) == 3
    assert sum(r["cost"] for r in rows) == pytest.approx(3 * sonnet_cost(12, 7), abs=1e-9)


# --- holes found by attacking the gateway, closed ----------------------------------------------------------------

@pytest.mark.gen_test
@pytest.mark.parametrize("content_type", [
    'application/json; x="multipart/"',  # a media type that only mentions multipart
    ["multipart/form-data; boundary=zz", "application/json"],  # two of them: the provider would read the last
])
async def test_a_content_type_trick_does_not_shrink_the_hold(content_type, make_gateway, serve, call, upstream):
    url = serve(await make_gateway(budget={"tight@example.com": {"limit": 0.05, "days": 1}}))
    body = orjson.dumps(messages_body(OPUS, max_tokens=1, messages=[{"role": "user", "content": "x" * 200_000}]))
    headers = [("x-api-key", token("tight@example.com"))]
    headers += [("Content-Type", value) for value in (content_type if isinstance(content_type, list) else [content_type])]
    status, _, answer = await raw_request(url, "POST", "/anthropic/v1/messages", headers, body)
    assert status in (400, 429) and upstream.state.requests == []
    if isinstance(content_type, list):
        assert orjson.loads(answer)["message"] == "Content-Type may be sent only once"


@pytest.mark.gen_test
@pytest.mark.parametrize("route,header", [("/anthropic/v1/messages", "x-api-key"),
                                          ("/openai/v1/chat/completions", "Authorization")])
async def test_a_credential_header_sent_twice_is_refused_and_nothing_is_sent(route, header, gateway, upstream,
                                                                              http_server, base_url):
    """Tornado joins the values of a repeated header: "sk-native,<token>" must not pass for a native key."""
    native = "sk-ant-user-native-key" if header == "x-api-key" else "Bearer sk-user-native-key"
    mine = token("twice@example.com") if header == "x-api-key" else f"Bearer {token('twice@example.com')}"
    body = orjson.dumps(messages_body() if route.startswith("/anthropic") else chat())
    status, _, answer = await raw_request(base_url, "POST", route, [
        (header, native), (header, mine), ("Content-Type", "application/json")], body)
    assert status == 400 and orjson.loads(answer)["message"] == f"{header} may be sent only once"
    assert upstream.state.requests == [] and b"twice" not in answer


@pytest.mark.gen_test
async def test_a_native_key_is_key_characters_only(gateway, upstream, call):
    r = await call("/openai/v1/chat/completions", "POST", json=chat(),
                   headers={"Authorization": f"Bearer sk-user-native-key,{token('rider@example.com')}"})
    assert r.code == 401 and upstream.state.requests == []


@pytest.mark.gen_test
async def test_openrouter_fallback_models_follow_the_rules_and_the_dearest_is_held(make_gateway, serve, call, upstream):
    gw = await make_gateway(budget={**RULES, "tight@example.com": {"limit": 0.002, "days": 1}})
    url = serve(gw)
    fallback = chat("openai/gpt-4o-mini", models=["openai/gpt-4o-mini", "anthropic/claude-sonnet-4"])
    r = await call(url + "/openrouter/v1/chat/completions", "POST", json=fallback, token=token(STUDENT))
    assert r.code == 403 and message(r) == "Model anthropic/claude-sonnet-4 is not allowed for you"
    # $0.002 fits gpt-4o-mini's hold for 1,000 output tokens ($0.0006) but not claude-sonnet-4's ($0.015)
    cheap = await call(url + "/openrouter/v1/chat/completions", "POST", json=chat("openai/gpt-4o-mini", max_tokens=1000),
                       token=token("tight@example.com"))
    assert cheap.code == 200
    held = await call(url + "/openrouter/v1/chat/completions", "POST", token=token("tight@example.com"),
                      json={**fallback, "max_tokens": 1000})
    assert held.code == 429 and "could cost up to" in message(held)
    bad = await call(url + "/openrouter/v1/chat/completions", "POST", token=token("tight@example.com"),
                     json=chat("openai/gpt-4o-mini", models="anthropic/claude-sonnet-4"))
    assert bad.code == 400 and message(bad).startswith("models must be a list")
    assert [r["path"] for r in upstream.state.requests].count("/api/v1/chat/completions") == 1


@pytest.mark.gen_test
async def test_an_absurd_web_search_count_bills_the_hold(make_gateway, serve, call, script):
    gw = await make_gateway(providers={"anthropic": {"base_url": script.url}})
    url = serve(gw)
    script.content_type = "application/json"
    script.pieces = [b'{"type":"message","content":[],"usage":{"input_tokens":12,"output_tokens":7,'
                     b'"server_tool_use":{"web_search_requests":1e18}}}']
    body = orjson.dumps(messages_body(OPUS))
    r = await call(url + "/anthropic/v1/messages", "POST", body=body,
                   headers={"x-api-key": token("searches@example.com"), "Content-Type": "application/json"})
    hold = (len(body) * 30 + 100 * 75) / 1e6
    assert r.code == 200 and await spent(gw, "searches@example.com") == pytest.approx(hold, abs=1e-9)


@pytest.mark.gen_test
async def test_a_stream_cut_before_message_delta_bills_what_was_relayed(make_gateway, serve, call, script):
    gw = await make_gateway(providers={"anthropic": {"base_url": script.url}})
    url = serve(gw)
    script.pieces = [message_start(input_tokens=12, output_tokens=1)] + [text_delta("word " * 20)] * 50
    r = await call(url + "/anthropic/v1/messages", "POST", json=messages_body(OPUS, stream=True, max_tokens=4000),
                   headers={"x-api-key": token("cut@example.com")})
    relayed = sum(len(line) - len(b"data: ") for line in r.body.split(b"\n") if line.startswith(b"data: "))
    assert await spent(gw, "cut@example.com") == pytest.approx(opus_cost(12, relayed // 4), abs=1e-9)
    assert relayed // 4 > 1000  # far more than message_start's one output token


@pytest.mark.gen_test
async def test_the_largest_max_tokens_spelling_is_held(make_gateway, serve, call, upstream):
    url = serve(await make_gateway(budget={"spell@example.com": {"limit": 0.01, "days": 1}}))
    body = chat("openai/gpt-4o-mini", max_completion_tokens=1, max_tokens=100_000)  # $0.06 of output at most
    r = await call(url + "/openrouter/v1/chat/completions", "POST", json=body, token=token("spell@example.com"))
    assert r.code == 429 and "could cost up to" in message(r)


@pytest.mark.gen_test
@pytest.mark.parametrize("route,body,tool", [
    ("/openai/v1/responses", {"model": "gpt-4o-mini", "input": "hi", "tools": [{"type": "web_search"}]}, "web_search"),
    ("/openai/v1/responses", {"model": "gpt-4o-mini", "input": "hi",
                              "tools": [{"type": "code_interpreter", "container": {"type": "auto"}}]}, "code_interpreter"),
    ("/openai/v1/responses", {"model": "gpt-4o-mini", "input": "hi",
                              "tools": [{"type": "file_search", "vector_store_ids": ["vs_1"]}]}, "file_search"),
    ("/openai/v1/chat/completions", chat(web_search_options={}), "web_search_options"),
    ("/geminiv1beta/models/gemini-2.5-flash:generateContent",
     {"contents": [{"parts": [{"text": "hi"}]}], "tools": [{"google_search": {}}]}, "google_search"),
    ("/geminiv1beta/models/gemini-2.5-flash:streamGenerateContent",
     {"contents": [{"parts": [{"text": "hi"}]}], "tools": [{"googleSearchRetrieval": {}}]}, "googleSearchRetrieval"),
    ("/anthropic/v1/messages", messages_body(tools=[{"type": "code_execution_20250825", "name": "code_execution"}]),
     "code_execution_20250825"),
])
async def test_tools_charged_beyond_tokens_at_unknown_prices_are_refused(route, body, tool, gateway, upstream, call):
    r = await call(route, "POST", json=body, token=token("tools@example.com"))
    assert r.code == 400 and message(r) == f"Tool {tool} is not supported here: what the provider charges for it is not priced"
    assert upstream.state.requests == []
    function = await call("/openai/v1/responses", "POST", token=token("tools@example.com"), json={
        "model": "gpt-4o-mini", "input": "hi", "tools": [{"type": "function", "name": "f", "parameters": {}}]})
    assert function.code == 200  # tools the app runs itself cost tokens only


@pytest.mark.gen_test
@pytest.mark.parametrize("route", ["/openai/v1/files", "/openai/v1/files/", "/openai/v1/batches",
                                   "/openai/v1/vector_stores", "/openai/v1/chat/completions",
                                   "/anthropic/v1/files", "/anthropic/v1/messages/batches", "/geminiv1beta/files",
                                   "/geminiv1beta/cachedContents"])
async def test_what_is_stored_on_the_shared_account_is_listed_only_to_admins(route, gateway, upstream, call):
    """Every user's uploads land on the operator's one account: a list would hand their ids to everyone."""
    r = await call(route, token=token("nosy@example.com"))
    assert r.code == 403 and message(r).startswith(f"Listing {route.split('/', 2)[2].join(['/', ''])} is for admins")
    assert upstream.state.requests == []
    admin = await call(route, token=token("admin@example.com"))
    assert admin.code != 403 and len(upstream.state.requests) == 1  # sent on (the fake may not serve it)
    one = await call("/openai/v1/files/file-abc", token=token("nosy@example.com"))  # by its id: whoever holds it
    models = await call("/anthropic/v1/models", token=token("nosy@example.com"))
    assert one.code == 200 and models.code == 200
