"""What is priced is what goes upstream: no spelling of a paid path reaches a provider unbilled."""
from __future__ import annotations

import orjson
import pytest

from .conftest import token
from .helpers import chat, raw_request, spent

pytestmark = pytest.mark.every_gateway  # over each store and admission (conftest.GATEWAY_MODES)

CHAT = orjson.dumps(chat())
JSON = {"Content-Type": "application/json"}

# Each of these was, or could be, read by an HTTP client or a provider's front end as /v1/chat/completions
# while the gateway saw a free path.
SMUGGLED = [
    "/openai/v1/files/../chat/completions",
    "/openai/v1/moderations/%2e%2e/chat/completions",
    "/openai/v1/moderations/%2E%2E/chat/completions",
    "/openai/v1/uploads/..%2fchat/completions",
    "/openai/v1/files%2f..%2fchat/completions",
    "/openai/v1/chat/completions%23/cancel",
    "/openai/v1/chat/completions%3Fx=/cancel",
    "/openai/v1/chat/completions%3fx=/cancel",
    "/openai/v1/files\\..\\chat/completions",
    "/openai/v1/files/..\\chat/completions",
    "/openai/v1/./files/../chat/completions",
    "/openai/v1/files/.",
    "/openai//v1/chat/completions",
    "/openai/v1/chat/completions;/cancel",
    "/openai/v1/chat/completions%00/cancel",
    "/openai/v1/chat/completions%0a/cancel",
    "/openai/v1/chat/%63ompletions",
    "/openrouter/v1/models/../chat/completions",
    "/geminiv1beta/models/x/../gemini-2.0-flash:generateContent",
    "/geminiv1beta/models/gemini-2.0-flash%3AgenerateContent",
]


@pytest.mark.gen_test
@pytest.mark.parametrize("target", SMUGGLED)
async def test_path_spellings_a_client_could_reread_are_refused_before_upstream(target, http_server, base_url, gateway, upstream):
    status, headers, body = await raw_request(base_url, "POST", target,
                                              {**JSON, "Authorization": f"Bearer {token('eve@example.com')}"}, CHAT)
    assert status == 400, body
    assert orjson.loads(body)["message"].startswith("Path not allowed")
    assert headers["access-control-allow-origin"] == "*"
    assert upstream.state.requests == []
    assert await spent(gateway, "eve@example.com") == 0.0


@pytest.mark.gen_test
@pytest.mark.parametrize("query", ["x=1#frag", "x=a\\b", "x=\xe9", "x=<script>"])
async def test_queries_a_url_cannot_carry_unchanged_are_refused(query, http_server, base_url, gateway, upstream):
    status, headers, body = await raw_request(base_url, "GET", f"/openai/v1/models?{query}",
                                              {"Authorization": f"Bearer {token('eve@example.com')}"})
    assert status == 400 and orjson.loads(body)["message"].startswith("Query not allowed"), (status, body)
    assert upstream.state.requests == []


@pytest.mark.gen_test
async def test_plain_paths_still_reach_the_provider_exactly_as_written(http_server, base_url, gateway, upstream):
    auth = {"Authorization": f"Bearer {token('ann@example.com')}"}
    status, _, _ = await raw_request(base_url, "GET", "/openai/v1/files/file-abc123/content?purpose=x%20y", auth)
    assert status == 200
    seen = upstream.state.last
    assert (seen["method"], seen["path"], seen["query"]) == ("GET", "/v1/files/file-abc123/content", "purpose=x%20y")
    status, _, body = await raw_request(base_url, "GET", "/openrouter/v1/models/openai/gpt-4o-mini/endpoints", auth)
    assert status == 200 and upstream.state.last["path"] == "/api/v1/models/openai/gpt-4o-mini/endpoints"


@pytest.mark.gen_test
@pytest.mark.parametrize("path", ["/v1/files", "/v1/files/file-1", "/v1/uploads", "/v1/uploads/upload_1/parts",
                                  "/v1/moderations", "/v1/batches/batch_1/cancel", "/v1/responses/resp_1/cancel",
                                  "/v1/threads/thread_1/runs/run_1/cancel", "/v1/fine_tuning/jobs/ftjob-1/pause",
                                  "/v1/fine_tuning/jobs/ftjob-1/resume"])
async def test_free_openai_posts_are_forwarded_unpriced(path, call, gateway, upstream):
    r = await call("/openai" + path, "POST", json={"input": "x"}, token=token("free@example.com"))
    assert r.code == 200 and upstream.state.last["path"] == path
    assert await spent(gateway, "free@example.com") == 0.0


@pytest.mark.gen_test
@pytest.mark.parametrize("path", ["/v1/chat/completions/cancel", "/v1/filesx", "/v1/files/a/b/c", "/v1/batches",
                                  "/v1/moderations/x", "/v1/uploads/u/other"])
async def test_posts_that_only_look_free_are_refused(path, call, gateway, upstream):
    for body in ({"input": "x"}, {"model": "gpt-4o-mini", "input": "x"}):  # a priced model does not make them priced
        r = await call("/openai" + path, "POST", json=body, token=token("free@example.com"))
        assert r.code == 400 and orjson.loads(r.body)["message"].startswith(f"OpenAI endpoint {path} is not supported")
    assert upstream.state.requests == []


@pytest.mark.gen_test
@pytest.mark.parametrize("path,body", [
    ("/v1/fine_tuning/jobs", {"model": "gpt-4o-mini-2024-07-18", "training_file": "file-abc"}),
    ("/v1/threads/runs", {"model": "gpt-4o-mini", "assistant_id": "asst_1"}),
    ("/v1/threads/thread_1/runs", {"model": "gpt-4o-mini", "assistant_id": "asst_1"}),
    ("/v1/realtime/sessions", {"model": "gpt-4o-realtime-preview"}),
    ("/v1/responses/input_tokens", {"model": "gpt-4o-mini", "input": "x"}),
])
async def test_work_that_goes_on_after_the_answer_is_refused_before_anything_is_sent(path, body, call, gateway,
                                                                                      upstream):
    """A fine-tuning job or an Assistants run would be billed one call's estimate for hours of work."""
    r = await call("/openai" + path, "POST", json=body, token=token("jobs@example.com"))
    assert r.code == 400 and orjson.loads(r.body)["message"].startswith(f"OpenAI endpoint {path} is not supported")
    background = await call("/openai/v1/responses", "POST", json={"model": "o4-mini", "input": "hi", "background": True},
                            token=token("jobs@example.com"))
    assert background.code == 400 and orjson.loads(background.body)["message"].startswith("Background responses")
    assert upstream.state.requests == [] and await spent(gateway, "jobs@example.com") == 0


@pytest.mark.gen_test
@pytest.mark.parametrize("method", ["GET", "DELETE"])
async def test_a_body_on_a_method_that_takes_none_is_refused(method, http_server, base_url, gateway, upstream):
    status, headers, body = await raw_request(
        base_url, method, "/openai/v1/chat/completions", {**JSON, "Authorization": f"Bearer {token('g@example.com')}"},
        CHAT)
    assert status == 400 and orjson.loads(body) == {"message": f"A {method} request cannot carry a body"}
    assert headers["access-control-allow-origin"] == "*"
    assert upstream.state.requests == []


@pytest.mark.gen_test
async def test_a_provider_named_in_percent_encoding_is_unknown(http_server, base_url, gateway, upstream):
    status, _, body = await raw_request(base_url, "POST", "/%6fpenai/v1/files/../chat/completions",
                                        {**JSON, "Authorization": f"Bearer {token('eve@example.com')}"}, CHAT)
    assert status in (400, 404) and upstream.state.requests == []
