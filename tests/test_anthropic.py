"""/anthropic/*: the official anthropic SDK works unchanged, and every call is billed to 1e-9 USD."""
from __future__ import annotations

import anthropic
import orjson
import pytest

from aipipe.sse import data_length, split_events

from .conftest import token
from .fake_anthropic import ANTHROPIC_REPLY
from .helpers import calls_finished, leave_mid_stream, message, settled, spent

pytestmark = pytest.mark.every_gateway  # over each store and admission (conftest.GATEWAY_MODES)

SONNET = "claude-sonnet-4-5-20250929"  # $3 / $15 per million; cache reads $0.30, writes $3.75 (5 min) and $6 (1 h)


def sonnet_cost(fresh: int, output: int, read: int = 0, write_5m: int = 0, write_1h: int = 0, searches: int = 0) -> float:
    return (fresh * 3 + read * 0.3 + write_5m * 3.75 + write_1h * 6 + output * 15) / 1e6 + searches * 0.01


def sdk(base_url: str, email: str, **kw) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=f"{base_url}/anthropic", api_key=token(email), max_retries=0, **kw)


def messages_body(model: str = SONNET, stream: bool = False, **extra) -> dict:
    body = {"model": model, "max_tokens": 1024, "messages": [{"role": "user", "content": "Say hello"}], **extra}
    return {**body, "stream": True} if stream else body


@pytest.mark.gen_test
async def test_the_official_sdk_sends_messages_json_and_streamed_and_both_are_billed(gateway, upstream, base_url,
                                                                                    http_server):
    upstream.state.cached_tokens, upstream.state.cache_write_tokens, upstream.state.cache_write_1h_tokens = 100, 200, 50
    client = sdk(base_url, "claude@example.com")
    try:
        reply = await client.messages.create(model=SONNET, max_tokens=1024,
                                             messages=[{"role": "user", "content": "Hi"}])
        assert reply.content[0].text == ANTHROPIC_REPLY and reply.usage.output_tokens == 7
        async with client.messages.stream(model=SONNET, max_tokens=1024,
                                          messages=[{"role": "user", "content": "Hi"}]) as stream:
            text = "".join([piece async for piece in stream.text_stream])
            final = await stream.get_final_message()
        assert sorted(text) == sorted(ANTHROPIC_REPLY) and final.usage.output_tokens == 7
    finally:
        await client.close()
    one = sonnet_cost(12, 7, read=100, write_5m=200, write_1h=50)
    assert await spent(gateway, "claude@example.com") == pytest.approx(2 * one, abs=1e-9)
    rows = await gateway.store.ledger("claude@example.com")
    assert sorted(r["streamed"] for r in rows) == [False, True]
    assert all(r["provider"] == "anthropic" and r["model"] == SONNET and r["input_tokens"] == 362 for r in rows)
    sent = upstream.state.requests[-1]
    assert sent["path"] == "/anthropic-api/v1/messages"
    assert sent["headers"]["X-Api-Key"] == "sk-ant-test-operator"  # the operator's key, never the caller's token
    assert sent["headers"]["Anthropic-Version"]  # the SDK's own version, passed on
    assert "Authorization" not in sent["headers"]


@pytest.mark.gen_test
@pytest.mark.parametrize("delta_has_input", [True, False])
async def test_a_stream_bills_message_starts_input_and_message_deltas_output_together(
        delta_has_input, gateway, upstream, call):
    """message_start carries input and cache counts (and output 1), message_delta the cumulative output: older API
    versions leave the input out of message_delta, newer ones repeat it. Either way, both halves are billed."""
    upstream.state.cached_tokens, upstream.state.cache_write_tokens = 1000, 3000
    upstream.state.completion_tokens, upstream.state.anthropic_delta_input = 500, delta_has_input
    r = await call("/anthropic/v1/messages", "POST", json=messages_body(stream=True),
                   headers={"x-api-key": token("parts@example.com")})
    assert r.code == 200 and b"event: message_start" in r.body and b"event: message_stop" in r.body
    assert await spent(gateway, "parts@example.com") == pytest.approx(
        sonnet_cost(12, 500, read=1000, write_5m=3000), abs=1e-9)


@pytest.mark.gen_test
async def test_the_token_is_taken_from_x_api_key_or_authorization_and_headers_pass_through(gateway, upstream, call):
    for headers in ({"x-api-key": token("keys@example.com")}, {"Authorization": f"Bearer {token('keys@example.com')}"}):
        r = await call("/anthropic/v1/messages", "POST", json=messages_body(),
                       headers={**headers, "anthropic-version": "2023-01-01", "anthropic-beta": "prompt-caching-x"})
        assert r.code == 200, r.body
        sent = upstream.state.requests[-1]["headers"]
        assert sent["Anthropic-Version"] == "2023-01-01" and sent["Anthropic-Beta"] == "prompt-caching-x"
        assert sent["X-Api-Key"] == "sk-ant-test-operator" and "Authorization" not in sent
    await settled(gateway)
    assert len(await gateway.store.ledger("keys@example.com")) == 2
    r = await call("/anthropic/v1/messages", "POST", json=messages_body(), headers={"x-api-key": token("keys@example.com")})
    assert r.code == 200 and upstream.state.last["headers"]["Anthropic-Version"] == "2023-06-01"  # the default
    bad = await call("/anthropic/v1/messages", "POST", json=messages_body(), headers={"x-api-key": "not-a-token"})
    assert bad.code == 401 and "not-a-token" not in bad.body.decode()
    assert len(upstream.state.requests) == 3


@pytest.mark.gen_test
async def test_count_tokens_and_models_are_free_and_batches_are_refused(gateway, upstream, call):
    t = {"x-api-key": token("free-claude@example.com")}
    counted = await call("/anthropic/v1/messages/count_tokens", "POST",
                         json={"model": SONNET, "messages": [{"role": "user", "content": "Hi"}]}, headers=t)
    assert counted.code == 200 and orjson.loads(counted.body) == {"input_tokens": 12}
    models = await call("/anthropic/v1/models", headers=t)
    assert models.code == 200 and orjson.loads(models.body)["data"][0]["id"] == SONNET
    sent = len(upstream.state.requests)
    for path in ("/v1/messages/batches", "/v1/messages/batches/msgbatch_1/cancel"):
        refused = await call("/anthropic" + path, "POST", json={"requests": []}, headers=t)
        assert refused.code == 400 and "batches are not supported" in message(refused)
    assert len(upstream.state.requests) == sent  # refused before anything went upstream
    assert await spent(gateway, "free-claude@example.com") == 0


@pytest.mark.gen_test
async def test_an_unpriced_model_or_unknown_endpoint_is_refused_before_anything_is_sent(gateway, upstream, call):
    t = {"x-api-key": token("unknown-claude@example.com")}
    r = await call("/anthropic/v1/messages", "POST", json=messages_body("claude-imaginary-9"), headers=t)
    assert r.code == 400 and message(r) == "Model claude-imaginary-9 pricing unknown"
    r = await call("/anthropic/v1/complete", "POST", json=messages_body(), headers=t)
    assert r.code == 400 and "not supported here" in message(r)
    r = await call("/anthropic/v1/messages", "POST", json={"max_tokens": 5}, headers=t)
    assert r.code == 400 and message(r).startswith("Pass a JSON body with {model}")
    assert upstream.state.requests == []


@pytest.mark.gen_test
async def test_web_searches_and_long_prompts_are_priced(gateway, upstream, call):
    upstream.state.web_searches = 3
    r = await call("/anthropic/v1/messages", "POST",
                   json=messages_body(tools=[{"type": "web_search_20250305", "name": "web_search", "max_uses": 5}]),
                   headers={"x-api-key": token("search@example.com")})
    assert r.code == 200
    assert await spent(gateway, "search@example.com") == pytest.approx(sonnet_cost(12, 7, searches=3), abs=1e-9)
    upstream.state.web_searches, upstream.state.prompt_tokens = 0, 250_000  # above 200k: $6 / $22.50 for all of it
    r = await call("/anthropic/v1/messages", "POST", json=messages_body(), headers={"x-api-key": token("long@example.com")})
    assert r.code == 200
    assert await spent(gateway, "long@example.com") == pytest.approx((250_000 * 6 + 7 * 22.5) / 1e6, abs=1e-9)


@pytest.mark.gen_test
async def test_a_stream_that_ends_before_its_final_usage_bills_what_was_relayed(gateway, upstream, call):
    """An `error` event after message_start (input 12, output 1) and before message_delta: the output count never
    came, so what was relayed is billed as output, a token per 4 bytes of event data (capped at the hold)."""
    upstream.state.anthropic_error_after = 4  # message_start, block start, ping, one delta, then `event: error`
    r = await call("/anthropic/v1/messages", "POST", json=messages_body(stream=True),
                   headers={"x-api-key": token("overloaded@example.com")})
    assert r.code == 200 and b"event: error" in r.body and b"overloaded_error" in r.body
    relayed = sum(map(data_length, split_events(r.body)))
    assert await spent(gateway, "overloaded@example.com") == pytest.approx(sonnet_cost(12, relayed // 4), abs=1e-9)
    assert relayed // 4 > 1


@pytest.mark.gen_test
async def test_a_refused_operator_key_is_502_and_the_sdk_maps_errors(gateway, upstream, base_url, http_server):
    client = sdk(base_url, "sdk-errors@example.com")
    try:
        upstream.state.status = 401
        with pytest.raises(anthropic.InternalServerError, match="provider credentials misconfigured"):
            await client.messages.create(model=SONNET, max_tokens=10, messages=[{"role": "user", "content": "Hi"}])
        upstream.state.status = 200
        with pytest.raises(anthropic.BadRequestError, match="pricing unknown"):
            await client.messages.create(model="claude-nope", max_tokens=10, messages=[{"role": "user", "content": "Hi"}])
    finally:
        await client.close()
    broke = sdk(base_url, "blocked@example.com")
    try:
        with pytest.raises(anthropic.RateLimitError, match="Usage"):
            await broke.messages.create(model=SONNET, max_tokens=10, messages=[{"role": "user", "content": "Hi"}])
    finally:
        await broke.close()
    assert await spent(gateway, "sdk-errors@example.com") == 0


@pytest.mark.gen_test
async def test_a_client_that_leaves_mid_stream_is_still_billed(app, gateway, upstream, http_server, http_port):
    upstream.state.events, upstream.state.event_delay = 20, 0.05
    first = await leave_mid_stream(http_port, "/anthropic/v1/messages", {"x-api-key": token("quit-claude@example.com")},
                                   orjson.dumps(messages_body(stream=True)), b"event: message_start")
    assert b"200 OK" in first
    await calls_finished(app, gateway)  # the gateway reads on to the usage after the client left
    rows = await gateway.store.ledger("quit-claude@example.com")
    assert len(rows) == 1 and rows[0]["aborted"] and rows[0]["streamed"]
    assert rows[0]["cost"] == pytest.approx(sonnet_cost(12, 7), abs=1e-9)


@pytest.mark.gen_test
async def test_a_native_anthropic_key_passes_through_untracked(gateway, upstream, call):
    r = await call("/anthropic/v1/messages", "POST", json=messages_body(), headers={"x-api-key": "sk-ant-user-native-key"})
    assert r.code == 200
    assert upstream.state.last["headers"]["X-Api-Key"] == "sk-ant-user-native-key"
    await settled(gateway)
    assert await gateway.store.ledger(None) == []


@pytest.mark.gen_test
async def test_streamed_one_hour_cache_writes_are_billed_once_at_their_own_price(gateway, upstream, call):
    """message_start splits cache writes into 5-minute and 1-hour ones; message_delta gives only their total."""
    upstream.state.prompt_tokens, upstream.state.cache_write_1h_tokens, upstream.state.completion_tokens = 1000, 10_000, 100
    r = await call("/anthropic/v1/messages", "POST", json=messages_body(stream=True),
                   headers={"x-api-key": token("cache-1h@example.com")})
    assert r.code == 200
    assert await spent(gateway, "cache-1h@example.com") == pytest.approx(
        sonnet_cost(1000, 100, write_1h=10_000), abs=1e-9)


@pytest.mark.gen_test
async def test_count_tokens_needs_a_model_whatever_its_content_type(gateway, upstream, call):
    r = await call("/anthropic/v1/messages/count_tokens", "POST", body=orjson.dumps({"model": SONNET, "messages": []}),
                   headers={"x-api-key": token("counting@example.com"), "Content-Type": "text/plain"})
    assert r.code == 400 and message(r).startswith("Pass a JSON body with {model}")
    assert upstream.state.requests == []


@pytest.mark.gen_test
async def test_web_searches_are_held_at_max_uses_however_large(make_gateway, serve, call, upstream):
    """A budget of $100 cannot admit a call that may run 20,000 searches at $0.01: refused before it is sent."""
    url = serve(await make_gateway(budget={"many-searches@example.com": {"limit": 100.0, "days": 1}}))
    tools = [{"type": "web_search_20250305", "name": "web_search", "max_uses": 20_000}]
    for uses in (20_000, 20_000.0):  # however the number is spelled
        tools[0]["max_uses"] = uses
        r = await call(url + "/anthropic/v1/messages", "POST", json=messages_body(tools=tools),
                       headers={"x-api-key": token("many-searches@example.com")})
        assert r.code == 429 and "could cost up to" in message(r)
    assert upstream.state.requests == []
    tools[0]["max_uses"] = 50  # $0.50 of searches: admitted
    r = await call(url + "/anthropic/v1/messages", "POST", json=messages_body(tools=tools),
                   headers={"x-api-key": token("many-searches@example.com")})
    assert r.code == 200
