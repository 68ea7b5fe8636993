"""Proxying Gemini: the path's model is priced, the server key goes upstream as x-goog-api-key, every answer is billed."""
from __future__ import annotations

import math

import orjson
import pytest

from .conftest import ENV, token
from .fake_gemini import GEMINI_REPLY
from .helpers import message, settled, spent, sse_data

pytestmark = pytest.mark.every_gateway  # over each store and admission (conftest.GATEWAY_MODES)

M = 1e-6  # prices below are USD per million tokens
FLASH_IN, FLASH_CACHED, FLASH_OUT = 0.3 * M, 0.03 * M, 2.5 * M
PRO_IN, PRO_OUT, PRO_LONG_IN, PRO_LONG_OUT = 1.25 * M, 10 * M, 2.5 * M, 15 * M
EMBED_IN = 0.15 * M
OPERATOR = ENV["GEMINI_API_KEY"]
PROMPT = {"contents": [{"role": "user", "parts": [{"text": "Say hello"}]}]}


def gen(model: str = "gemini-2.5-flash", action: str = "generateContent", query: str = "") -> str:
    return f"/geminiv1beta/models/{model}:{action}" + (f"?{query}" if query else "")


def embed_body(text: str) -> dict:
    return {"content": {"parts": [{"text": text}]}}


async def ledger_row(gateway, email: str) -> dict:
    await settled(gateway)
    return (await gateway.store.ledger(email))[0]


@pytest.mark.gen_test
async def test_generate_content_is_relayed_and_billed_with_thoughts_as_output(call, gateway, upstream):
    upstream.state.reasoning_tokens = 5
    r = await call(gen(), "POST", json=PROMPT, token=token("g@example.com"))
    assert r.code == 200
    body = orjson.loads(r.body)
    assert body["candidates"][0]["content"]["parts"][0]["text"] == GEMINI_REPLY
    expected = 12 * FLASH_IN + (7 + 5) * FLASH_OUT
    assert float(r.headers["X-AIPipe-Cost"]) == pytest.approx(expected, abs=1e-12)
    assert await spent(gateway, "g@example.com") == pytest.approx(expected, abs=1e-12)
    row = await ledger_row(gateway, "g@example.com")
    assert (row["provider"], row["model"], row["input_tokens"], row["output_tokens"]) == ("gemini", "gemini-2.5-flash", 12, 12)


@pytest.mark.gen_test
async def test_upstream_gets_the_server_key_and_never_the_callers_token(call, gateway, upstream):
    t = token("h@example.com")
    r = await call(gen(query="key=" + t), "POST", json=PROMPT, token=t, headers={"Cookie": "session=1"})
    assert r.code == 200
    seen = upstream.state.last
    assert seen["path"] == "/v1beta/models/gemini-2.5-flash:generateContent"
    headers = {k.lower(): v for k, v in seen["headers"].items()}
    assert headers["x-goog-api-key"] == OPERATOR
    assert "authorization" not in headers and "cookie" not in headers
    assert t not in repr(seen["headers"]) and t not in seen["query"]  # the ?key= is dropped too


@pytest.mark.gen_test
async def test_token_in_x_goog_api_key_header_is_accepted(call, gateway, upstream):
    t = token("k@example.com")
    r = await call(gen(), "POST", json=PROMPT, headers={"x-goog-api-key": t})
    assert r.code == 200
    assert upstream.state.last["headers"]["X-Goog-Api-Key"] == OPERATOR
    assert await spent(gateway, "k@example.com") == pytest.approx(12 * FLASH_IN + 7 * FLASH_OUT, abs=1e-12)


@pytest.mark.gen_test
async def test_missing_or_bad_token_is_refused_before_upstream(call, gateway, upstream):
    r = await call(gen(), "POST", json=PROMPT)
    assert r.code == 401 and message(r) == "Missing Authorization: Bearer token"
    r = await call(gen(), "POST", json=PROMPT, headers={"x-goog-api-key": "not-a-token"})
    assert r.code == 401
    assert upstream.state.requests == []


@pytest.mark.gen_test
async def test_native_gemini_key_passes_through_untracked(call, gateway, upstream):
    r = await call(gen(), "POST", json=PROMPT, headers={"x-goog-api-key": "AIza-user-native-key"})
    assert r.code == 200
    headers = upstream.state.last["headers"]
    assert headers["X-Goog-Api-Key"] == "AIza-user-native-key" and "Authorization" not in headers
    await settled(gateway)
    assert await gateway.store.ledger() == []


@pytest.mark.gen_test
async def test_sse_stream_is_relayed_and_billed_from_the_last_usage_not_the_first(call, gateway, upstream):
    upstream.state.split, upstream.state.completion_tokens, upstream.state.reasoning_tokens = 5, 40, 3
    r = await call(gen(action="streamGenerateContent", query="alt=sse"), "POST", json=PROMPT, token=token("s@example.com"))
    assert r.code == 200 and r.headers["Content-Type"].startswith("text/event-stream")
    assert b"\r\n\r\n" in r.body  # Google's separators reach the client untouched
    chunks = sse_data(r.body)
    assert "".join(c["candidates"][0]["content"]["parts"][0]["text"] for c in chunks) == GEMINI_REPLY
    assert chunks[0]["usageMetadata"]["candidatesTokenCount"] < chunks[-1]["usageMetadata"]["candidatesTokenCount"] == 40
    expected = 12 * FLASH_IN + (40 + 3) * FLASH_OUT
    assert await spent(gateway, "s@example.com") == pytest.approx(expected, abs=1e-12)
    row = await ledger_row(gateway, "s@example.com")
    assert row["streamed"] and row["output_tokens"] == 43


@pytest.mark.gen_test
async def test_json_array_stream_without_alt_sse_is_billed(call, gateway, upstream):
    upstream.state.split, upstream.state.completion_tokens = 9, 30
    r = await call(gen(action="streamGenerateContent"), "POST", json=PROMPT, token=token("a@example.com"))
    assert r.code == 200
    chunks = orjson.loads(r.body)
    assert isinstance(chunks, list) and len(chunks) == upstream.state.events
    assert "".join(c["candidates"][0]["content"]["parts"][0]["text"] for c in chunks) == GEMINI_REPLY
    expected = 12 * FLASH_IN + 30 * FLASH_OUT  # the last chunk's usage, not the first's (6) nor a sum
    assert float(r.headers["X-AIPipe-Cost"]) == pytest.approx(expected, abs=1e-12)
    assert await spent(gateway, "a@example.com") == pytest.approx(expected, abs=1e-12)


@pytest.mark.gen_test
async def test_cached_tokens_use_the_cached_price(call, gateway, upstream):
    upstream.state.prompt_tokens, upstream.state.cached_tokens = 1000, 800
    r = await call(gen(), "POST", json=PROMPT, token=token("c@example.com"))
    assert r.code == 200
    expected = 200 * FLASH_IN + 800 * FLASH_CACHED + 7 * FLASH_OUT
    assert await spent(gateway, "c@example.com") == pytest.approx(expected, abs=1e-12)


@pytest.mark.gen_test
async def test_prompts_over_200k_tokens_use_the_long_context_price(call, gateway, upstream):
    upstream.state.prompt_tokens = 250_000
    r = await call(gen("gemini-2.5-pro"), "POST", json=PROMPT, token=token("long@example.com"))
    assert r.code == 200
    assert await spent(gateway, "long@example.com") == pytest.approx(250_000 * PRO_LONG_IN + 7 * PRO_LONG_OUT, abs=1e-12)


@pytest.mark.gen_test
async def test_model_in_the_body_cannot_change_the_price(call, gateway, upstream):
    body = {**PROMPT, "model": "gemini-2.5-flash-lite"}
    r = await call(gen("gemini-2.5-pro"), "POST", json=body, token=token("m@example.com"))
    assert r.code == 200
    assert await spent(gateway, "m@example.com") == pytest.approx(12 * PRO_IN + 7 * PRO_OUT, abs=1e-12)
    # and an unpriced path model stays unpriced, whatever cheap model the body names
    r = await call(gen("gemini-ultra-9"), "POST", json=body, token=token("m@example.com"))
    assert r.code == 400 and message(r) == "Model gemini-ultra-9 pricing unknown"
    assert len(upstream.state.requests) == 1


@pytest.mark.gen_test
@pytest.mark.parametrize("action", ["generateContent", "streamGenerateContent", "embedContent", "batchEmbedContents"])
async def test_unknown_model_is_refused_before_anything_goes_upstream(call, gateway, upstream, action):
    r = await call(gen("gemini-0.1-nonesuch", action), "POST", json=PROMPT, token=token("u@example.com"))
    assert r.code == 400 and message(r) == "Model gemini-0.1-nonesuch pricing unknown"
    assert r.headers["Access-Control-Allow-Origin"] == "*"
    assert upstream.state.requests == []


@pytest.mark.gen_test
async def test_embed_content_is_charged_for_estimated_input_tokens(call, gateway, upstream):
    text = "The quick brown fox jumps over the lazy dog"  # 43 characters -> 11 tokens
    r = await call(gen("gemini-embedding-001", "embedContent"), "POST", json=embed_body(text), token=token("e@example.com"))
    assert r.code == 200
    assert len(orjson.loads(r.body)["embedding"]["values"]) == 8
    assert await spent(gateway, "e@example.com") == pytest.approx(11 * EMBED_IN, abs=1e-12)
    assert (await ledger_row(gateway, "e@example.com"))["input_tokens"] == 11


@pytest.mark.gen_test
async def test_batch_embed_contents_is_charged_per_item(call, gateway, upstream):
    texts = ["a", "hello world", "x" * 401]  # 1 + 3 + 101 tokens
    body = {"requests": [{"model": "models/gemini-embedding-001", **embed_body(t)} for t in texts]}
    r = await call(gen("gemini-embedding-001", "batchEmbedContents"), "POST", json=body, token=token("b@example.com"))
    assert r.code == 200 and len(orjson.loads(r.body)["embeddings"]) == 3
    expected = sum(math.ceil(len(t) / 4) for t in texts) * EMBED_IN
    assert await spent(gateway, "b@example.com") == pytest.approx(expected, abs=1e-12)


@pytest.mark.gen_test
async def test_count_tokens_is_free(call, gateway, upstream):
    r = await call(gen("gemini-2.5-flash", "countTokens"), "POST", json=PROMPT, token=token("n@example.com"))
    assert r.code == 200 and orjson.loads(r.body)["totalTokens"] == 3
    assert await spent(gateway, "n@example.com") == 0


@pytest.mark.gen_test
async def test_listing_models_is_free(call, gateway, upstream):
    r = await call("/geminiv1beta/models", token=token("l@example.com"))
    assert r.code == 200 and orjson.loads(r.body)["models"][0]["name"] == "models/gemini-2.5-flash"
    assert upstream.state.last["headers"]["X-Goog-Api-Key"] == OPERATOR
    assert await spent(gateway, "l@example.com") == 0


@pytest.mark.gen_test
async def test_unpriceable_methods_and_endpoints_are_refused(call, gateway, upstream):
    t = token("p@example.com")
    r = await call(gen("imagen-4.0-generate-001", "predict"), "POST", json={}, token=t)
    assert r.code == 400 and message(r) == "Gemini method predict is not supported here"
    r = await call("/geminiv1beta/cachedContents", "POST", json={}, token=t)
    assert r.code == 400 and message(r) == "Gemini endpoint /cachedContents is not supported here"
    assert upstream.state.requests == []


@pytest.mark.gen_test
async def test_body_of_any_content_type_is_forwarded_intact(call, gateway, upstream):
    raw = b'{"contents":[{"parts":[{"text":"hi"}]}],  "extra": "kept as sent"}'
    r = await call(gen(), "POST", body=raw, headers={"Content-Type": "text/plain"}, token=token("raw@example.com"))
    assert r.code == 200
    assert upstream.state.last["body"] == raw
    assert await spent(gateway, "raw@example.com") == pytest.approx(12 * FLASH_IN + 7 * FLASH_OUT, abs=1e-12)


@pytest.mark.gen_test
async def test_upstream_errors_pass_through_and_cost_nothing(call, gateway, upstream):
    upstream.state.status = 503
    r = await call(gen(), "POST", json=PROMPT, token=token("x@example.com"))
    assert r.code == 503 and orjson.loads(r.body)["error"]["status"] == "INTERNAL"
    assert await spent(gateway, "x@example.com") == 0


@pytest.mark.gen_test
async def test_server_without_gemini_key_says_so(make_gateway, serve, call, upstream):
    url = serve(await make_gateway(env={"GEMINI_API_KEY": ""}))
    r = await call(url + gen(), "POST", json=PROMPT, token=token("nokey@example.com"))
    assert r.code == 503 and message(r) == "gemini is not configured on this server"
    assert upstream.state.requests == []


@pytest.mark.gen_test
async def test_refused_operator_key_is_502_without_googles_text(make_gateway, serve, call, upstream, caplog):
    url = serve(await make_gateway(env={"GEMINI_API_KEY": "AIza-revoked-operator-key"}))
    r = await call(url + gen(), "POST", json=PROMPT, token=token("k@example.com"))
    assert r.code == 502 and message(r) == "provider credentials misconfigured"
    assert b"API key not valid" not in r.body
    assert any("GEMINI_API_KEY" in rec.getMessage() for rec in caplog.records)
    r = await call(url + gen(), "POST", json=PROMPT, headers={"x-goog-api-key": "AIza-users-own-bad-key"})
    assert r.code == 400 and b"API key not valid" in r.body  # a user's own key: Google's answer is theirs to see


@pytest.mark.gen_test
async def test_audio_prompt_tokens_use_the_audio_price(call, gateway, upstream):
    from aipipe.pricing import PriceTable, cost_of
    from aipipe.usage import read_usage
    meta = {"usageMetadata": {"promptTokenCount": 1000, "candidatesTokenCount": 10,
                              "promptTokensDetails": [{"modality": "TEXT", "tokenCount": 400},
                                                      {"modality": "AUDIO", "tokenCount": 600}]}}
    usage = read_usage(meta)
    assert usage.audio_input_tokens == 600
    flash = PriceTable.shipped().lookup("gemini", "gemini-2.5-flash")
    assert cost_of(flash, usage) == pytest.approx(400 * FLASH_IN + 600 * flash.audio_input / 1e6 + 10 * FLASH_OUT, abs=1e-12)
    assert flash.audio_input / 1e6 > FLASH_IN
