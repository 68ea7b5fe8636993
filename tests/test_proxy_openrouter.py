"""Proxying OpenRouter: billed by its reported cost, else by its model list, refused when unpriced."""
from __future__ import annotations

import asyncio

import orjson
import pytest
from tornado.httputil import HTTPHeaders

from aipipe.providers import PROVIDERS
from aipipe.providers.base import Call

from .conftest import token
from .fake_upstream import OPERATOR_KEYS
from .helpers import calls_finished, chat, leave_mid_stream, message, spent, sse_data

pytestmark = pytest.mark.every_gateway  # over each store and admission (conftest.GATEWAY_MODES)


@pytest.mark.gen_test
async def test_openrouter_json_is_billed_by_reported_cost(call, gateway, upstream):
    r = await call("/openrouter/v1/chat/completions", "POST", json=chat("openai/gpt-4o-mini"), token=token("o@example.com"))
    assert r.code == 200
    assert HTTPHeaders(upstream.state.last["headers"])["Authorization"] == f"Bearer {OPERATOR_KEYS['openrouter']}"
    assert float(r.headers["X-AIPipe-Cost"]) == pytest.approx(0.000123, abs=1e-12)
    assert await spent(gateway, "o@example.com") == pytest.approx(0.000123, abs=1e-12)


@pytest.mark.gen_test
async def test_openrouter_without_cost_uses_model_list_prices(call, gateway, upstream):
    upstream.state.openrouter_cost = None
    upstream.state.prompt_tokens, upstream.state.completion_tokens = 1000, 2000
    r = await call("/openrouter/v1/chat/completions", "POST", json=chat("anthropic/claude-sonnet-4"), token=token("o@example.com"))
    assert r.code == 200
    assert await spent(gateway, "o@example.com") == pytest.approx(1000 * 3e-6 + 2000 * 15e-6, abs=1e-12)


@pytest.mark.gen_test
async def test_openrouter_stream_with_comments_is_billed_from_last_chunk(call, gateway, upstream):
    upstream.state.split = 11
    upstream.state.crlf = True
    r = await call("/openrouter/v1/chat/completions", "POST", json=chat("openai/gpt-4o-mini", stream=True),
                   token=token("os@example.com"))
    assert r.code == 200 and b": OPENROUTER PROCESSING" in r.body
    assert sse_data(r.body)[-1]["usage"]["cost"] == 0.000123  # OpenRouter's own usage chunk reaches the client
    assert await spent(gateway, "os@example.com") == pytest.approx(0.000123, abs=1e-12)


@pytest.mark.gen_test
async def test_openrouter_unknown_model_is_refused_and_refetches_are_rate_limited(call, gateway, upstream):
    t = token("o@example.com")
    for i in range(5):
        r = await call("/openrouter/v1/chat/completions", "POST", json=chat(f"nobody/model-{i}"), token=t)
        assert r.code == 400 and message(r) == f"Model nobody/model-{i} pricing unknown"
    assert upstream.state.models_fetches == 1  # one fetch, not one per unknown model
    assert not any(req["path"].endswith("/chat/completions") for req in upstream.state.requests)


@pytest.mark.gen_test
async def test_openrouter_routing_suffix_prices_like_base_model(call, gateway, upstream):
    upstream.state.openrouter_cost = None
    r = await call("/openrouter/v1/chat/completions", "POST", json=chat("openai/gpt-4o-mini:nitro"), token=token("n@example.com"))
    assert r.code == 200
    assert await spent(gateway, "n@example.com") == pytest.approx(12 * 0.15e-6 + 7 * 0.6e-6, abs=1e-12)


@pytest.mark.gen_test
async def test_openrouter_models_list_passes_through(call, gateway, upstream):
    r = await call("/openrouter/v1/models", token=token("o@example.com"))
    assert r.code == 200 and orjson.loads(r.body)["data"][0]["id"] == "openai/gpt-4o-mini"


@pytest.mark.gen_test
async def test_client_that_leaves_mid_stream_is_still_billed(app, gateway, upstream, http_server, http_port):
    """The client reads the first event and hangs up; the gateway reads on to the usage and bills it."""
    upstream.state.events, upstream.state.event_delay = 20, 0.05
    first = await leave_mid_stream(http_port, "/openai/v1/chat/completions",
                                   {"Authorization": f"Bearer {token('quit@example.com')}"},
                                   orjson.dumps(chat(stream=True)), b"\n\n")
    assert b"200 OK" in first
    await calls_finished(app, gateway)  # the gateway reads on to the usage after the client left
    rows = await gateway.store.ledger("quit@example.com")
    assert len(rows) == 1 and rows[0]["aborted"] and rows[0]["streamed"]
    assert rows[0]["cost"] == pytest.approx(12 * 0.15e-6 + 7 * 0.6e-6, abs=1e-12)


@pytest.mark.gen_test(timeout=30)
async def test_calls_arriving_while_the_price_list_loads_wait_for_it(call, gateway, upstream):
    upstream.state.models_delay = 0.5
    first = asyncio.ensure_future(call("/openrouter/v1/chat/completions", "POST", json=chat("openai/gpt-4o-mini"),
                                      token=token("eager@example.com")))
    for _ in range(200):  # until the list's fetch has started (and set its fetched_at)
        if upstream.state.models_fetches:
            break
        await asyncio.sleep(0.01)
    assert upstream.state.models_fetches == 1 and not first.done()
    models = ["openai/gpt-4o-mini", "anthropic/claude-sonnet-4", "openai/gpt-4o-mini:nitro"] * 6 + ["nobody/x"]
    rest = [call("/openrouter/v1/chat/completions", "POST", json=chat(m), token=token(f"eager{i}@example.com"))
            for i, m in enumerate(models)]  # a user each: the per-user concurrency limit is not what is tested
    answers = await asyncio.gather(first, *rest)
    assert [r.code for r in answers] == [200] * 19 + [400]
    assert message(answers[-1]) == "Model nobody/x pricing unknown"
    assert upstream.state.models_fetches == 1


@pytest.mark.gen_test
async def test_the_model_list_gives_each_price_its_maximum_output():
    from aipipe.providers.openrouter import ModelCatalog
    from aipipe.upstream import Answer

    listing = {"data": [
        {"id": "a/capped", "pricing": {"prompt": "0.000001", "completion": "0.000002"},
         "context_length": 200000, "top_provider": {"max_completion_tokens": 8192}},
        {"id": "b/context-only", "pricing": {"prompt": "0.000001", "completion": "0.000002"}, "context_length": 65536},
    ]}

    class Http:  # the Upstream client's fetch, answering the listing
        async def fetch(self, method, url, headers=None, body=None, **timeouts):
            return Answer(200, [("Content-Type", "application/json")], orjson.dumps(listing))
    catalog = ModelCatalog("http://127.0.0.1:1/v1/models", Http())
    assert (await catalog.price("a/capped")).max_output == 8192
    assert (await catalog.price("b/context-only")).max_output == 65536


@pytest.mark.gen_test
@pytest.mark.parametrize("extra,results", [
    ({"plugins": [{"id": "web"}]}, 5), ({"plugins": [{"id": "web", "max_results": 10}]}, 10),
    ({"plugins": [{"id": "web", "max_results": 5000}]}, 5000),  # as many as asked: no cap below the request
    ({"plugins": [{"id": "web", "max_results": 100.0}]}, 100),  # the same number to a JSON reader
    ({"plugins": [{"id": "web", "max_results": 2}, {"id": "web", "max_results": 40}]}, 40),  # the largest
    ({"model": "openai/gpt-4o-mini:online"}, 5), ({}, 0)])
async def test_the_web_plugin_is_held_at_its_price_per_result(extra, results, make_gateway, serve, call, upstream):
    """OpenRouter bills web results in usage.cost; admission must have held them, so a budget bounds them too."""
    gw = await make_gateway()
    body = {**chat("openai/gpt-4o-mini", max_tokens=100), **extra}
    call_ = Call("POST", "/v1/chat/completions", "", HTTPHeaders({"Content-Type": "application/json"}), orjson.dumps(body))
    await PROVIDERS["openrouter"].prepare(call_, gw)
    tokens = (len(call_.body) * 0.15 + 100 * 0.6) / 1e6  # a token a byte in, max_tokens out, at gpt-4o-mini's price
    assert call_.hold == pytest.approx(tokens + results * 0.004, abs=1e-9)


@pytest.mark.gen_test
@pytest.mark.parametrize("extra,results", [({"plugins": [{"id": "web", "max_results": 3}]}, 3),
                                           ({"model": "openai/gpt-4o-mini:online"}, 5)])
async def test_web_results_are_billed_when_the_answer_reports_no_cost(extra, results, call, gateway, upstream):
    """Without usage.cost the call is priced from the model list, and the web results it allowed are added."""
    upstream.state.openrouter_cost = None
    body = {**chat("openai/gpt-4o-mini"), **extra}
    r = await call("/openrouter/v1/chat/completions", "POST", json=body, token=token("web-list@example.com"))
    assert r.code == 200
    expected = 12 * 0.15e-6 + 7 * 0.6e-6 + results * 0.004
    assert await spent(gateway, "web-list@example.com") == pytest.approx(expected, abs=1e-9)
