"""Budgets bound spending: a call is let through only when the most it can cost still fits the limit.

Run over SQLite with budgets in memory (a lone server, admission "auto"), SQLite with every admission a
store transaction (admission "store"), and PostgreSQL, including two gateways sharing one schema.
"""
from __future__ import annotations

import asyncio
import re

import orjson
import pytest
from tornado.httpclient import AsyncHTTPClient, HTTPRequest
from tornado.httputil import HTTPHeaders

from aipipe.budget import today_utc, usd
from aipipe.pricing import PriceTable
from aipipe.providers.base import Call, set_hold
from aipipe.providers.openrouter import price_from_pricing

from .conftest import token
from .helpers import chat, settled

USER = "bound@example.com"
TABLE = PriceTable.shipped()
GPT41_IN, GPT41_OUT, GPT41_MAX = 2e-6, 8e-6, 32768  # USD per token; gpt-4.1's maximum output
MINI_IN, MINI_OUT, MINI_MAX = 0.15e-6, 0.6e-6, 16384
HINT = re.compile(r"^Usage \$[0-9.e-]+ / \$1 in 1 days; this call could cost up to \$([0-9.e-]+): set max_tokens lower$")


@pytest.fixture(params=["memory", "store"])
def admission(request, store_kind):
    """Where admission happens: budgets in memory (a lone SQLite server) or a transaction in the store."""
    if store_kind == "postgres" and request.param == "memory":
        pytest.skip("a PostgreSQL server always admits in the store")
    return request.param


@pytest.fixture
def client():
    http = AsyncHTTPClient(force_instance=True, max_clients=64)  # the shared client would queue all but 10
    yield http
    http.close()


async def gateway_for(make_gateway, admission: str, **sections):
    gw = await make_gateway(storage={"admission": "auto" if admission == "memory" else "store"},
                            budget={USER: {"limit": 1.0, "days": 1}}, **sections)
    assert (gw.books is not None) == (admission == "memory")
    return gw


async def post(client, base: str, body: dict, email: str = USER):
    req = HTTPRequest(base + "/openai/v1/chat/completions", method="POST", body=orjson.dumps(body),
                      headers={"Authorization": f"Bearer {token(email)}", "Content-Type": "application/json"},
                      request_timeout=60)
    return await client.fetch(req, raise_error=False)


def message(response) -> str:
    return orjson.loads(response.body)["message"]


async def billed(gw, email: str = USER) -> list[float]:
    await settled(gw)
    return [r["cost"] for r in await gw.store.ledger(email, limit=1000) if r["kind"] == "request"]


# --- what a call holds ------------------------------------------------------------------------------

def held(body: dict | bytes, model: str, provider: str = "openai", ctype: str = "application/json", **kw) -> float:
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    call = Call("POST", "/v1/chat/completions", "", HTTPHeaders({"Content-Type": ctype}), raw)
    call.json() if "json" in ctype else None
    set_hold(call, TABLE.lookup(provider, model), 0.01, **kw)
    return call.hold


def test_a_call_naming_no_max_tokens_holds_the_models_whole_output_and_a_token_per_body_byte():
    body = chat("gpt-4.1")
    assert held(body, "gpt-4.1") == pytest.approx(len(orjson.dumps(body)) * GPT41_IN + GPT41_MAX * GPT41_OUT, abs=1e-12)
    # no $0.01 default on top any more: the output cap already bounds the call
    body = chat("gpt-4o-mini")
    assert held(body, "gpt-4o-mini") == pytest.approx(len(orjson.dumps(body)) * MINI_IN + MINI_MAX * MINI_OUT, abs=1e-12)


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens", "max_output_tokens"])
def test_n_choices_hold_n_times_the_requests_cap(field):
    body = chat("gpt-4o-mini", n=3, **{field: 1000})
    assert held(body, "gpt-4o-mini") == pytest.approx(len(orjson.dumps(body)) * MINI_IN + 3 * 1000 * MINI_OUT, abs=1e-12)
    body = chat("gpt-4o-mini", n=10_000, max_tokens=10)  # no provider answers that many: held as 128
    assert held(body, "gpt-4o-mini") == pytest.approx(len(orjson.dumps(body)) * MINI_IN + 128 * 10 * MINI_OUT, abs=1e-12)


def test_gemini_candidate_count_and_max_output_tokens_and_long_prompt_price():
    body = {"contents": [{"parts": [{"text": "hi"}]}], "generationConfig": {"maxOutputTokens": 500, "candidateCount": 2}}
    assert held(body, "gemini-2.5-flash", "gemini") == pytest.approx(
        len(orjson.dumps(body)) * 0.3e-6 + 2 * 500 * 2.5e-6, abs=1e-12)
    body = {"contents": [{"parts": [{"text": "hi"}]}]}
    assert held(body, "gemini-2.5-pro", "gemini") == pytest.approx(len(orjson.dumps(body)) * 1.25e-6 + 65536 * 10e-6,
                                                                   abs=1e-12)


def test_audio_output_is_held_at_the_audio_price_and_unknown_maxima_at_the_default():
    body = chat("gpt-4o-audio-preview", max_tokens=100)
    assert held(body, "gpt-4o-audio-preview") == pytest.approx(len(orjson.dumps(body)) * 2.5e-6 + 100 * 80e-6, abs=1e-12)
    body = chat("gpt-4-32k")  # its maximum output is not in the table: limits.default_max_output_tokens
    assert held(body, "gpt-4-32k", default_max_output=1000) == pytest.approx(
        len(orjson.dumps(body)) * 60e-6 + 1000 * 120e-6, abs=1e-12)


def test_uploaded_audio_cannot_be_bounded_and_holds_the_default_on_top():
    form = b"--b\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper-1\r\n--b--\r\n"
    assert held(form, "whisper-1", ctype="multipart/form-data; boundary=b") == pytest.approx(0.01, abs=1e-12)
    assert held(form, "gpt-4o-transcribe", ctype="multipart/form-data; boundary=b") == pytest.approx(
        2000 * 10e-6 + 0.01, abs=1e-12)


def test_openrouter_maximum_output_comes_from_the_model_list():
    pricing = {"prompt": "0.000003", "completion": "0.000015"}
    assert price_from_pricing(pricing, {"top_provider": {"max_completion_tokens": 64000}, "context_length": 200000}
                              ).max_output == 64000
    assert price_from_pricing(pricing, {"top_provider": {"max_completion_tokens": None}, "context_length": 131072}
                              ).max_output == 131072
    assert price_from_pricing(pricing).max_output == 0  # unknown: limits.default_max_output_tokens applies


# --- admission through the gateway -------------------------------------------------------------------

@pytest.mark.gen_test(timeout=60)
async def test_parallel_calls_without_max_tokens_never_spend_past_the_limit(make_gateway, serve, upstream, client,
                                                                             admission):
    gw = await gateway_for(make_gateway, admission)
    base = serve(gw)
    upstream.state.delay = 0.3  # all eight are in flight together
    upstream.state.completion_tokens = 30_000  # each call really costs about $0.24
    body = chat("gpt-4.1")
    hold = len(orjson.dumps(body)) * GPT41_IN + GPT41_MAX * GPT41_OUT
    responses = await asyncio.gather(*(post(client, base, body) for _ in range(8)))
    ok = [r for r in responses if r.code == 200]
    refused = [r for r in responses if r.code != 200]
    assert len(ok) >= int(1 / hold) == 3  # as many as their holds fit, and no more (the old rule let all 8 through)
    for r in refused:
        assert r.code == 429
        hint = HINT.match(message(r))
        assert hint and float(hint.group(1)) == pytest.approx(hold, abs=1e-6), message(r)  # six decimals shown
    costs = await billed(gw)
    one = 12 * GPT41_IN + 30_000 * GPT41_OUT
    assert costs == pytest.approx([one] * len(ok), abs=1e-9)
    assert await gw.store.spend(USER, today_utc()) <= 1.0 + 1e-9


@pytest.mark.gen_test(timeout=60)
async def test_a_call_is_admitted_only_when_its_most_fits_what_is_left(make_gateway, serve, upstream, client, admission):
    gw = await gateway_for(make_gateway, admission)
    base = serve(gw)
    await gw.set_cost(USER, today_utc(), 0.99)  # a cent left
    cheap = chat("gpt-4o-mini")  # holds about $0.0098: 16,384 output tokens
    assert (await post(client, base, cheap)).code == 200
    greedy = chat("gpt-4o-mini", max_tokens=20_000)  # could cost $0.012
    r = await post(client, base, greedy)
    assert r.code == 429
    hint = HINT.match(message(r))
    assert hint and float(hint.group(1)) == pytest.approx(len(orjson.dumps(greedy)) * MINI_IN + 20_000 * MINI_OUT,
                                                          abs=1e-6)  # the message shows six decimals
    assert (await post(client, base, chat("gpt-4o-mini", max_tokens=1000))).code == 200
    costs = await billed(gw)
    assert costs == pytest.approx([12 * MINI_IN + 7 * MINI_OUT] * 2, abs=1e-12)
    assert len(upstream.state.requests) == 2  # the refused call never went upstream


@pytest.mark.gen_test(timeout=60)
async def test_n_choices_are_held_n_times(make_gateway, serve, upstream, client, admission):
    gw = await gateway_for(make_gateway, admission)
    base = serve(gw)
    await gw.set_cost(USER, today_utc(), 1.0 - 0.0015)
    three = chat("gpt-4o-mini", max_tokens=1000, n=3)  # $0.0018 of output at most: does not fit
    r = await post(client, base, three)
    assert r.code == 429 and HINT.match(message(r)), message(r)
    assert float(HINT.match(message(r)).group(1)) == pytest.approx(
        len(orjson.dumps(three)) * MINI_IN + 3000 * MINI_OUT, abs=1e-6)  # the message shows six decimals
    assert (await post(client, base, chat("gpt-4o-mini", max_tokens=1000))).code == 200  # one choice fits


@pytest.mark.gen_test(timeout=60)
async def test_usage_beyond_the_hold_is_billed_in_full(make_gateway, serve, upstream, client, admission):
    """Input the body only points at (an image by URL) can cost more than the hold: the charge is never capped."""
    gw = await gateway_for(make_gateway, admission)
    base = serve(gw)
    await gw.set_cost(USER, today_utc(), 0.98)
    body = chat("gpt-4o-mini", max_tokens=10, messages=[{"role": "user", "content": [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": "https://example.com/large.png"}}]}])
    upstream.state.prompt_tokens, upstream.state.completion_tokens = 200_000, 10
    r = await post(client, base, body)
    assert r.code == 200
    cost = 200_000 * MINI_IN + 10 * MINI_OUT
    assert cost > len(orjson.dumps(body)) * MINI_IN + 10 * MINI_OUT  # more than was held
    assert float(r.headers["X-AIPipe-Cost"]) == pytest.approx(cost, abs=1e-9)
    assert await billed(gw) == pytest.approx([cost], abs=1e-9)
    assert await gw.store.spend(USER, today_utc()) == pytest.approx(0.98 + cost, abs=1e-9)  # $0.01 past the limit
    r = await post(client, base, chat("gpt-4o-mini", max_tokens=1))
    assert r.code == 429 and message(r) == f"Usage ${usd(0.98 + cost)} / $1 in 1 days"  # nothing left: no hint


@pytest.mark.gen_test(timeout=90)
async def test_two_gateways_on_one_postgres_schema_share_the_bound(store_kind, make_gateway, serve, upstream, client):
    if store_kind != "postgres":
        pytest.skip("two gateways share a budget through PostgreSQL")
    gateways = [await make_gateway(budget={USER: {"limit": 1.0, "days": 1}}) for _ in range(2)]
    assert gateways[0].store.url == gateways[1].store.url and all(gw.books is None for gw in gateways)
    bases = [serve(gw) for gw in gateways]
    upstream.state.delay = 0.3
    upstream.state.completion_tokens = 30_000
    body = chat("gpt-4.1")
    hold = len(orjson.dumps(body)) * GPT41_IN + GPT41_MAX * GPT41_OUT
    responses = await asyncio.gather(*(post(client, bases[i % 2], body) for i in range(8)))
    ok = [r for r in responses if r.code == 200]
    assert len(ok) >= int(1 / hold) == 3 and len(ok) < 8
    assert all(r.code == 429 and HINT.match(message(r)) for r in responses if r.code != 200)
    for gw in gateways:
        await settled(gw)
    rows = [r for r in await gateways[0].store.ledger(USER, limit=1000) if r["kind"] == "request"]
    assert len(rows) == len(ok)
    assert await gateways[1].store.spend(USER, today_utc()) <= 1.0 + 1e-9


@pytest.mark.gen_test
async def test_a_gemini_body_that_may_pass_200k_tokens_is_held_at_the_long_prompt_price(gateway):
    from aipipe.providers.gemini import PROVIDER as GEMINI
    body = orjson.dumps({"contents": [{"parts": [{"text": "x" * 250_000}]}], "generationConfig": {"maxOutputTokens": 100}})
    call = Call("POST", "/models/gemini-2.5-pro:generateContent", "", HTTPHeaders({"Content-Type": "application/json"}), body)
    await GEMINI.prepare(call, gateway)
    assert call.hold == pytest.approx(len(body) * 2.5e-6 + 100 * 15e-6, abs=1e-12)  # gemini-2.5-pro>200k prices
