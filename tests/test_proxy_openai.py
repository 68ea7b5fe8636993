"""Proxying OpenAI: what the client gets back, what the provider sees, and what the user is billed."""
from __future__ import annotations

import asyncio
import logging

import orjson
import pytest
from tornado.httputil import HTTPHeaders

from .conftest import token
from .fake_upstream import OPERATOR_KEYS, REPLY
from .helpers import chat, message, settled, spent, sse_data

pytestmark = pytest.mark.every_gateway  # over each store and admission (conftest.GATEWAY_MODES)

MINI_IN, MINI_CACHED, MINI_OUT = 0.15e-6, 0.075e-6, 0.6e-6  # gpt-4o-mini, USD per token


@pytest.mark.gen_test
async def test_chat_completion_json_is_relayed_and_billed_to_the_cent(call, gateway, upstream):
    t = token("alice@example.com")
    r = await call("/openai/v1/chat/completions", "POST", json=chat(), token=t)
    assert r.code == 200
    body = orjson.loads(r.body)
    assert body["choices"][0]["message"]["content"] == REPLY
    expected = 12 * MINI_IN + 7 * MINI_OUT
    assert float(r.headers["X-AIPipe-Cost"]) == pytest.approx(expected, abs=1e-12)
    assert float(r.headers["X-AIPipe-Overhead-Ms"]) >= 0
    assert await spent(gateway, "alice@example.com") == pytest.approx(expected, abs=1e-12)
    rows = await gateway.store.ledger("alice@example.com")
    assert rows[0]["model"] == "gpt-4o-mini" and rows[0]["input_tokens"] == 12 and rows[0]["output_tokens"] == 7
    assert rows[0]["status"] == 200 and not rows[0]["streamed"] and not rows[0]["aborted"]


@pytest.mark.gen_test
async def test_cached_and_reasoning_tokens_use_their_prices(call, gateway, upstream):
    upstream.state.prompt_tokens, upstream.state.cached_tokens = 1000, 400
    upstream.state.completion_tokens, upstream.state.reasoning_tokens = 300, 200
    r = await call("/openai/v1/chat/completions", "POST", json=chat(), token=token("c@example.com"))
    assert r.code == 200
    expected = 600 * MINI_IN + 400 * MINI_CACHED + 300 * MINI_OUT  # reasoning is part of completion
    assert await spent(gateway, "c@example.com") == pytest.approx(expected, abs=1e-12)


@pytest.mark.gen_test
async def test_dated_snapshot_uses_base_model_price(call, gateway, upstream):
    r = await call("/openai/v1/chat/completions", "POST", json=chat("gpt-4o-mini-2024-07-18"), token=token("d@example.com"))
    assert r.code == 200
    assert await spent(gateway, "d@example.com") == pytest.approx(12 * MINI_IN + 7 * MINI_OUT, abs=1e-12)


@pytest.mark.gen_test
async def test_stream_is_relayed_event_by_event_and_billed(call, gateway, upstream):
    upstream.state.split = 7  # the provider's bytes arrive cut at arbitrary points, even inside UTF-8 characters
    r = await call("/openai/v1/chat/completions", "POST", json=chat(stream=True), token=token("s@example.com"))
    assert r.code == 200
    assert r.headers["Content-Type"].startswith("text/event-stream")
    chunks = sse_data(r.body)
    text = "".join((c["choices"][0]["delta"].get("content") or "") for c in chunks if c["choices"])
    assert sorted(text) == sorted(REPLY)
    # the gateway asked for usage itself, so the usage-only chunk is hidden from the client
    assert all(c["choices"] for c in chunks)
    assert r.body.rstrip().endswith(b"data: [DONE]")
    sent = orjson.loads(upstream.state.last["body"])
    assert sent["stream_options"] == {"include_usage": True}
    assert await spent(gateway, "s@example.com") == pytest.approx(12 * MINI_IN + 7 * MINI_OUT, abs=1e-12)
    row = (await gateway.store.ledger("s@example.com"))[0]
    assert row["streamed"] and not row["aborted"]


@pytest.mark.gen_test
async def test_stream_with_client_asked_usage_keeps_the_usage_chunk(call, gateway, upstream):
    body = chat(stream=True, stream_options={"include_usage": True})
    r = await call("/openai/v1/chat/completions", "POST", json=body, token=token("u@example.com"))
    chunks = sse_data(r.body)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 7
    assert upstream.state.last["body"] == orjson.dumps(body)  # forwarded byte for byte
    assert await spent(gateway, "u@example.com") == pytest.approx(12 * MINI_IN + 7 * MINI_OUT, abs=1e-12)


@pytest.mark.gen_test
async def test_crlf_separated_stream_is_billed(call, gateway, upstream):
    upstream.state.crlf, upstream.state.split = True, 5
    r = await call("/openai/v1/chat/completions", "POST", json=chat(stream=True), token=token("crlf@example.com"))
    assert r.code == 200 and b"\r\n\r\n" in r.body
    assert await spent(gateway, "crlf@example.com") == pytest.approx(12 * MINI_IN + 7 * MINI_OUT, abs=1e-12)


@pytest.mark.gen_test
async def test_responses_api_json_and_stream_are_billed(call, gateway, upstream):
    t = token("resp@example.com")
    r = await call("/openai/v1/responses", "POST", json={"model": "gpt-4o-mini", "input": "hi"}, token=t)
    assert r.code == 200 and orjson.loads(r.body)["usage"]["input_tokens"] == 12
    r = await call("/openai/v1/responses", "POST", json={"model": "gpt-4o-mini", "input": "hi", "stream": True}, token=t)
    assert r.code == 200 and b"event: response.completed" in r.body
    assert await spent(gateway, "resp@example.com") == pytest.approx(2 * (12 * MINI_IN + 7 * MINI_OUT), abs=1e-12)


@pytest.mark.gen_test
async def test_embeddings_are_billed_at_input_price(call, gateway, upstream):
    r = await call("/openai/v1/embeddings", "POST", json={"model": "text-embedding-3-small", "input": ["abcdefgh" * 10]},
                   token=token("e@example.com"))
    assert r.code == 200
    assert await spent(gateway, "e@example.com") == pytest.approx(20 * 0.02e-6, abs=1e-15)


@pytest.mark.gen_test
async def test_multipart_transcription_is_forwarded_intact_and_billed_per_minute(call, gateway, upstream):
    boundary = "----aipipe-test"
    audio = bytes(range(256)) * 50
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper-1\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.mp3\"\r\n"
            f"Content-Type: audio/mpeg\r\n\r\n").encode() + audio + f"\r\n--{boundary}--\r\n".encode()
    r = await call("/openai/v1/audio/transcriptions", "POST", body=body, token=token("w@example.com"),
                   headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert r.code == 200, r.body
    assert orjson.loads(r.body)["text"] == f"heard {len(audio)} bytes with whisper-1"
    assert upstream.state.last["body"] == body
    assert await spent(gateway, "w@example.com") == pytest.approx(1.5 * 0.006, abs=1e-12)  # 90 s


@pytest.mark.gen_test
async def test_text_to_speech_is_billed_by_characters_never_free(call, gateway, upstream):
    text = "Hello there, this is spoken." * 3
    r = await call("/openai/v1/audio/speech", "POST", json={"model": "tts-1", "input": text, "voice": "alloy"},
                   token=token("tts@example.com"))
    assert r.code == 200 and r.headers["Content-Type"] == "audio/mpeg" and r.body.startswith(b"ID3")
    assert await spent(gateway, "tts@example.com") == pytest.approx(len(text) * 15e-6, abs=1e-12)


@pytest.mark.gen_test
async def test_answer_without_usage_is_charged_the_estimate(call, gateway, upstream):
    upstream.state.omit_usage = True
    body = chat(max_tokens=100)
    r = await call("/openai/v1/chat/completions", "POST", json=body, token=token("nousage@example.com"))
    assert r.code == 200
    charged = await spent(gateway, "nousage@example.com")
    assert charged == pytest.approx(len(orjson.dumps(body)) // 4 * MINI_IN + 100 * MINI_OUT, abs=1e-12)
    assert charged > 0


@pytest.mark.gen_test
async def test_unpriced_model_is_refused_before_going_upstream(call, gateway, upstream):
    r = await call("/openai/v1/chat/completions", "POST", json=chat("gpt-secret-9"), token=token("a@example.com"))
    assert r.code == 400 and message(r) == "Model gpt-secret-9 pricing unknown"
    assert upstream.state.requests == []


@pytest.mark.gen_test
@pytest.mark.parametrize("body,ctype", [(b'{"messages": []}', "application/json"), (b"hello", "text/plain"), (b"", None)])
async def test_post_without_model_is_refused(call, gateway, upstream, body, ctype):
    headers = {"Content-Type": ctype} if ctype else {}
    r = await call("/openai/v1/chat/completions", "POST", body=body, headers=headers, token=token("a@example.com"))
    assert r.code == 400 and message(r) == "Pass a JSON body with {model} so we can calculate cost"
    assert upstream.state.requests == []


@pytest.mark.gen_test
async def test_invalid_json_body_is_400_not_500(call, gateway, upstream):
    r = await call("/openai/v1/chat/completions", "POST", body=b'{"model": "gpt-4o-mini",',
                   headers={"Content-Type": "application/json"}, token=token("a@example.com"))
    assert r.code == 400 and message(r) == "Request body is not valid JSON"
    assert r.headers["Access-Control-Allow-Origin"] == "*"


@pytest.mark.gen_test
async def test_request_headers_go_upstream_on_an_allow_list(call, gateway, upstream):
    t = token("admin@example.com")  # listing the account's files is for admins
    r = await call("/openai/v1/files?purpose=batch&limit=2", "GET", token=t, headers={
        "Cookie": "session=1", "Origin": "https://app.example", "Referer": "https://app.example/page",
        "OpenAI-Organization": "org-evil", "OpenAI-Project": "proj-evil", "OpenAI-Beta": "assistants=v2",
        "X-Forwarded-For": "1.2.3.4", "Accept": "application/json", "User-Agent": "my-app/1.0",
        "X-Stainless-Lang": "python"})
    assert r.code == 200
    seen = HTTPHeaders(upstream.state.last["headers"])
    assert seen["Authorization"] == f"Bearer {OPERATOR_KEYS['openai']}"
    assert seen["OpenAI-Beta"] == "assistants=v2" and seen["Accept"] == "application/json"
    assert seen["User-Agent"] == "my-app/1.0"
    assert seen.get_list("X-Stainless-Lang") == ["python"]  # a prefix on the allow-list
    for name in ("Cookie", "Origin", "Referer", "OpenAI-Organization", "OpenAI-Project", "X-Forwarded-For"):
        assert name not in seen, name
    assert upstream.state.last["path"] == "/v1/files" and upstream.state.last["query"] == "purpose=batch&limit=2"
    assert t.encode() not in orjson.dumps(upstream.state.last["headers"])


@pytest.mark.gen_test
async def test_response_headers_hide_the_operators_account(call, gateway, upstream):
    r = await call("/openai/v1/chat/completions", "POST", json=chat(), token=token("a@example.com"))
    assert "openai-organization" not in r.headers
    assert "alt-svc" not in r.headers and "strict-transport-security" not in r.headers  # the provider's origin's
    for name in ("CF-RAY", "cf-cache-status", "x-envoy-upstream-service-time"):  # its CDN's and proxies' internals
        assert name not in r.headers, name
    assert "Server" not in r.headers and len(r.headers.get_list("Date")) == 1  # neither the provider's nor Tornado's
    assert r.headers["x-request-id"] == "req_fake"
    assert r.headers.get_list("Content-Type") == ["application/json"]


@pytest.mark.gen_test
async def test_models_list_is_free_and_passes_through(call, gateway, upstream):
    r = await call("/openai/v1/models", token=token("m@example.com"))
    assert r.code == 200 and orjson.loads(r.body)["data"][0]["id"] == "gpt-4o-mini"
    assert await spent(gateway, "m@example.com") == 0


@pytest.mark.gen_test
async def test_native_key_passes_through_untracked(call, gateway, upstream):
    r = await call("/openai/v1/chat/completions", "POST", json=chat(), headers={"Authorization": "Bearer sk-user-native-key"})
    assert r.code == 200
    assert HTTPHeaders(upstream.state.last["headers"])["Authorization"] == "Bearer sk-user-native-key"
    await settled(gateway)
    assert await gateway.store.all_usage() == []


@pytest.mark.gen_test
async def test_native_keys_can_be_switched_off(make_gateway, serve, call, upstream):
    url = serve(await make_gateway(auth={"allow_native_keys": False}))
    r = await call(url + "/openai/v1/models", headers={"Authorization": "Bearer sk-user-native-key"})
    assert r.code == 401 and "AI Pipe token" in message(r)
    assert upstream.state.requests == []


@pytest.mark.gen_test
async def test_operator_key_rejected_becomes_502_without_provider_text(call, gateway, upstream, caplog):
    upstream.state.status = 401
    r = await call("/openai/v1/chat/completions", "POST", json=chat(), token=token("a@example.com"))
    assert r.code == 502 and message(r) == "provider credentials misconfigured"
    assert b"Incorrect API key" not in r.body and b"sk-" not in r.body
    assert any("OPENAI_API_KEY" in rec.getMessage() for rec in caplog.records)
    assert await spent(gateway, "a@example.com") == 0


@pytest.mark.gen_test
async def test_native_key_rejection_passes_through(call, gateway, upstream):
    r = await call("/openai/v1/chat/completions", "POST", json=chat(), headers={"Authorization": "Bearer sk-wrong"})
    assert r.code == 401 and b"Incorrect API key" in r.body


@pytest.mark.gen_test
async def test_upstream_error_passes_through_and_costs_nothing(call, gateway, upstream):
    upstream.state.status = 500
    r = await call("/openai/v1/chat/completions", "POST", json=chat(), token=token("err@example.com"))
    assert r.code == 500 and b"server_error" in r.body
    assert r.headers["Access-Control-Allow-Origin"] == "*"
    assert await spent(gateway, "err@example.com") == 0
    assert await gateway.store.open_holds("err@example.com", 0) == 0  # the hold was released


@pytest.mark.gen_test
async def test_unreachable_provider_is_502(make_gateway, serve, call, upstream):
    import tornado.testing
    dead_sock, dead_port = tornado.testing.bind_unused_port()
    dead_sock.close()  # nothing listens here any more
    url = serve(await make_gateway(providers={"openai": {"base_url": f"http://127.0.0.1:{dead_port}"}}))
    r = await call(url + "/openai/v1/chat/completions", "POST", json=chat(), token=token("a@example.com"))
    assert r.code == 502 and message(r).startswith("Could not reach openai")
    assert r.headers["Access-Control-Allow-Origin"] == "*"


@pytest.mark.gen_test
async def test_a_provider_answering_nonsense_is_502_and_the_log_keeps_the_query_out(make_gateway, serve, call, caplog):
    async def nonsense(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 abc nonsense\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(nonsense, "127.0.0.1", 0)
    try:
        port = server.sockets[0].getsockname()[1]
        url = serve(await make_gateway(providers={"openai": {"base_url": f"http://127.0.0.1:{port}"}}))
        with caplog.at_level(logging.WARNING):
            r = await call(url + "/openai/v1/chat/completions?secret=q-0123", "POST", json=chat(),
                           token=token("odd@example.com"))
    finally:
        server.close()
    assert r.code == 502 and message(r) == "Could not reach openai: the answer was not valid HTTP"
    assert "no answer from openai" in caplog.text
    assert "q-0123" not in caplog.text  # aiohttp's own text of this error holds the URL with its query


@pytest.mark.gen_test
async def test_slow_provider_times_out_with_504(make_gateway, serve, call, upstream):
    upstream.state.delay = 2.0
    url = serve(await make_gateway(limits={"upstream_timeout": 0.3}))
    r = await call(url + "/openai/v1/chat/completions", "POST", json=chat(), token=token("late@example.com"))
    assert r.code == 504 and message(r) == "openai did not answer in time"


@pytest.mark.gen_test
async def test_missing_operator_key_is_503(make_gateway, serve, call, upstream):
    url = serve(await make_gateway(env={"OPENAI_API_KEY": ""}))
    r = await call(url + "/openai/v1/models", token=token("a@example.com"))
    assert r.code == 503 and message(r) == "openai is not configured on this server"


@pytest.mark.gen_test
@pytest.mark.parametrize("model,extra,each", [
    ("dall-e-3", {}, 0.04), ("dall-e-3", {"quality": "hd", "size": "1792x1024"}, 0.12),
    ("dall-e-3", {"quality": "standard", "size": "1024x1792"}, 0.08), ("dall-e-3", {"size": "4096x4096"}, 0.12),
    ("dall-e-2", {"size": "256x256", "n": 3}, 0.016), ("dall-e-2", {"quality": ["hd"]}, 0.02),
])
async def test_images_are_billed_by_quality_and_size_and_an_unknown_one_at_the_dearest(model, extra, each, call, gateway,
                                                                                      upstream):
    r = await call("/openai/v1/images/generations", "POST", json={"model": model, "prompt": "a cat", **extra},
                   token=token("draw@example.com"))
    assert r.code == 200
    n = extra.get("n", 1)
    assert await spent(gateway, "draw@example.com") == pytest.approx(each * n, abs=1e-9)


@pytest.mark.gen_test
@pytest.mark.parametrize("fields,each,n", [({"n": "10"}, 0.02, 10), ({"n": "3", "size": "256x256"}, 0.016, 3),
                                           ({}, 0.02, 1)])
async def test_an_image_variation_sent_as_a_form_is_billed_for_every_image_asked(fields, each, n, call, gateway,
                                                                                  upstream):
    boundary = "----aipipe-images"
    parts = {"model": "dall-e-2", **fields}
    body = "".join(f"--{boundary}\r\nContent-Disposition: form-data; name=\"{k}\"\r\n\r\n{v}\r\n" for k, v in parts.items())
    body = (body + f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.png\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + b"\x89PNG" * 100 + f"\r\n--{boundary}--\r\n".encode()
    r = await call("/openai/v1/images/variations", "POST", body=body, token=token("forms@example.com"),
                   headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert r.code == 200
    assert await spent(gateway, "forms@example.com") == pytest.approx(each * n, abs=1e-9)


@pytest.mark.gen_test
async def test_a_stream_on_the_path_with_a_trailing_slash_still_asks_for_its_usage(call, gateway, upstream):
    r = await call("/openai/v1/chat/completions/", "POST", json=chat(stream=True), token=token("slash@example.com"))
    assert orjson.loads(upstream.state.last["body"])["stream_options"] == {"include_usage": True}
    assert r.code in (200, 404)  # whatever the provider makes of the path, the usage was asked for


@pytest.mark.gen_test
async def test_search_models_pay_their_search_fee_on_every_call(call, gateway, upstream):
    """gpt-4o-search-preview searches on every call ($25 per 1,000 calls on top of tokens); web_search_options
    is taken there and refused elsewhere, where its fee is not priced."""
    r = await call("/openai/v1/chat/completions", "POST", token=token("searcher@example.com"),
                   json=chat("gpt-4o-search-preview", web_search_options={"search_context_size": "high"}))
    assert r.code == 200
    assert await spent(gateway, "searcher@example.com") == pytest.approx((12 * 2.5 + 7 * 10) / 1e6 + 0.025, abs=1e-9)
    r = await call("/openai/v1/chat/completions", "POST", token=token("searcher@example.com"),
                   json=chat("gpt-4o-mini-search-preview"))
    assert r.code == 200
    assert await spent(gateway, "searcher@example.com") == pytest.approx(
        (12 * 2.5 + 7 * 10) / 1e6 + 0.025 + (12 * 0.15 + 7 * 0.6) / 1e6 + 0.025, abs=1e-9)
    r = await call("/openai/v1/chat/completions", "POST", token=token("searcher@example.com"),
                   json=chat("gpt-4o-mini", web_search_options={}))
    assert r.code == 400 and "web_search_options" in message(r)
