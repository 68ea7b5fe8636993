"""Provider calls are served without a RequestHandler (handlers.lean): what a client sees is still what the
base handler sends, errors included, and every call still leaves an access-log line."""
from __future__ import annotations

import asyncio
import logging
import time
from email.utils import parsedate_to_datetime

import orjson
import pytest
from tornado import httputil
from tornado.httpclient import AsyncHTTPClient

from aipipe.handlers.lean import http_date
from aipipe.providers import PROVIDERS

from .conftest import token
from .helpers import chat, message, settled, spent, tracebacks

pytestmark = pytest.mark.every_gateway  # over each store and admission (conftest.GATEWAY_MODES)


def assert_json_error(r, status: int, text: str) -> None:
    assert r.code == status and message(r) == text
    assert r.headers["Content-Type"] == "application/json"
    assert r.headers["Access-Control-Allow-Origin"] == "*"
    assert "X-AIPipe-Cost" in r.headers["Access-Control-Expose-Headers"]


@pytest.mark.gen_test
async def test_path_that_is_not_utf8_is_400_json(call, gateway, upstream):
    r = await call("/openai/v1/%ff%fe", "POST", json=chat(), token=token("bytes@example.com"))
    assert_json_error(r, 400, "Invalid unicode in url")
    assert upstream.state.requests == []


@pytest.mark.gen_test
async def test_method_no_provider_takes_is_405_json(call, gateway, upstream):
    r = await call("/openai/v1/chat/completions", "PROPFIND", token=token("webdav@example.com"))
    assert_json_error(r, 405, "Method Not Allowed")
    assert upstream.state.requests == []


@pytest.mark.gen_test
async def test_unexpected_failure_is_500_json_logged_and_the_server_goes_on(call, gateway, upstream, monkeypatch, caplog):
    async def broken(call_, gw):
        raise RuntimeError("bug in a provider module")

    with monkeypatch.context() as patch:
        patch.setattr(PROVIDERS["openai"], "prepare", broken)
        with caplog.at_level(logging.ERROR):
            r = await call("/openai/v1/chat/completions?key=query-secret-0042", "POST", json=chat(),
                           token=token("bug@example.com"))
    assert_json_error(r, 500, "Internal server error")
    assert b"bug in a provider module" not in r.body
    logged = [rec for rec in caplog.records if rec.exc_info and rec.exc_info[0] is RuntimeError]
    assert logged and "POST /openai/v1/chat/completions (" in logged[0].getMessage()
    assert "query-secret-0042" not in caplog.text  # a query can carry keys: the log names the path alone
    assert upstream.state.requests == []
    r = await call("/openai/v1/chat/completions", "POST", json=chat(), token=token("bug@example.com"))
    assert r.code == 200 and orjson.loads(r.body)["usage"]["completion_tokens"] == 7


@pytest.mark.gen_test
async def test_head_call_is_relayed_without_a_body(call, gateway, upstream):
    r = await call("/openai/v1/files/file-abc", "HEAD", token=token("head@example.com"))
    assert r.code == 200 and r.body == b"" and r.headers["Content-Type"] == "application/json"
    assert upstream.state.requests[-1]["method"] == "HEAD"
    assert r.headers["Access-Control-Allow-Origin"] == "*"
    r = await call("/openai/v1/models", token=token("head@example.com"))  # the connection is still in order
    assert r.code == 200 and "gpt-4o-mini" in [m["id"] for m in orjson.loads(r.body)["data"]]


@pytest.mark.gen_test
async def test_call_sends_server_date_and_its_access_line(call, gateway, upstream, caplog):
    with caplog.at_level(logging.INFO, logger="aipipe.access"):
        before = time.time()
        r = await call("/openai/v1/chat/completions", "POST", json=chat(), token=token("logged@example.com"))
    assert r.code == 200
    stamp = parsedate_to_datetime(r.headers["Date"]).timestamp()
    assert int(before) <= stamp <= time.time() and "Server" not in r.headers
    lines = [rec.getMessage() for rec in caplog.records if rec.name == "aipipe.access"]
    assert any(line.startswith("200 POST /openai/v1/chat/completions ") for line in lines), lines
    await settled(gateway)
    assert await spent(gateway, "logged@example.com") == pytest.approx((12 * 0.15 + 7 * 0.60) / 1e6, abs=1e-12)


def test_http_date_is_formatted_once_a_second_and_follows_the_clock():
    for t in (1_700_000_000.2, 1_700_000_000.9, 1_700_000_001.0, 1_600_000_000.5, 1_700_000_001.4):
        assert http_date(t) == httputil.format_timestamp(int(t))


BOUNDARY = "aipipe-test-boundary"
FORM = (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper-1\r\n"
        f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n"
        f"Content-Type: audio/wav\r\n\r\nRIFFxxxx\r\n--{BOUNDARY}--\r\n").encode()
FORM_TYPE = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}


@pytest.mark.gen_test
@pytest.mark.parametrize(("path", "who", "status", "text"), [
    ("/openai/v1/audio/transcriptions", None, 401, "Missing Authorization: Bearer token"),
    ("/openai/v1/audio/transcriptions", "blocked@example.com", 429, "Usage $0 / $0 in 1 days"),
    ("/nosuch/v1/audio/transcriptions", "form@example.com", 404, "Unknown provider: nosuch"),
])
async def test_errors_on_a_form_upload_keep_their_status(call, gateway, upstream, path, who, status, text):
    r = await call(path, "POST", body=FORM, headers=FORM_TYPE, token=token(who) if who else None)
    assert_json_error(r, status, text)
    assert upstream.state.requests == []


async def answering(answer: bytes):
    """A one-shot provider on loopback that reads a request and sends `answer` as it is."""
    async def handle(reader, writer):
        head = await reader.readuntil(b"\r\n\r\n")
        length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                       if line.lower().startswith(b"content-length:")), 0)
        await reader.readexactly(length)
        writer.write(answer)
        await writer.drain()
        writer.close()
    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


@pytest.mark.gen_test
@pytest.mark.parametrize("reason", [b"Caf\xe9", b"OK <script>", b"OK \x01"])
async def test_odd_reason_phrase_from_the_provider_gives_way_to_the_standard_one(make_gateway, serve, reason):
    body = orjson.dumps({"id": "x", "object": "chat.completion", "model": "gpt-4o-mini", "choices": [],
                         "usage": {"prompt_tokens": 10, "completion_tokens": 0, "total_tokens": 10}})
    server, port = await answering(b"HTTP/1.1 200 " + reason + b"\r\nContent-Type: application/json\r\n"
                                   + b"Content-Length: %d\r\n\r\n" % len(body) + body)
    try:
        gw = await make_gateway(providers={"openai": {"base_url": f"http://127.0.0.1:{port}"}})
        reader, writer = await asyncio.open_connection("127.0.0.1", int(serve(gw).rsplit(":", 1)[1]))
        payload = orjson.dumps(chat())
        writer.write(b"POST /openai/v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                     b"Authorization: Bearer " + token("reason@example.com").encode() + b"\r\n"
                     b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(payload) + payload)
        answer = await asyncio.wait_for(reader.read(), 10)
        writer.close()
    finally:
        server.close()
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n")
    assert answer.endswith(body)
    await settled(gw)
    assert await spent(gw, "reason@example.com") == pytest.approx(10 * 0.15 / 1e6, abs=1e-12)


@pytest.mark.gen_test
async def test_provider_header_with_a_control_character_is_dropped_and_the_answer_relayed_and_billed(
        make_gateway, serve, caplog):
    body = b'{"id": "c", "model": "gpt-4o-mini", "usage": {"prompt_tokens": 10, "completion_tokens": 4}}'
    server, port = await answering(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Odd: a\x01b\r\n"
                                   + b"X-Fine: yes\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    try:
        gw = await make_gateway(providers={"openai": {"base_url": f"http://127.0.0.1:{port}"}})
        with caplog.at_level(logging.WARNING):
            r = await AsyncHTTPClient().fetch(
                serve(gw) + "/openai/v1/chat/completions", method="POST", raise_error=False,
                body=orjson.dumps({"model": "gpt-4o-mini", "messages": []}),
                headers={"Authorization": "Bearer " + token("odd@example.com"), "Content-Type": "application/json"})
    finally:
        server.close()
    assert r.code == 200 and r.body == body
    assert "X-Odd" not in r.headers and r.headers["X-Fine"] == "yes"
    assert tracebacks(caplog.records) == []
    assert any("X-Odd" in rec.getMessage() and "a\x01b" not in rec.getMessage() for rec in caplog.records)
    assert await spent(gw, "odd@example.com") == pytest.approx(10 * 0.15e-6 + 4 * 0.6e-6, abs=1e-12)


# What LeanCall copies from RequestHandler, pinned: the headers every answer carries, Content-Length, and
# answers that may not have a body.

@pytest.mark.gen_test
async def test_an_answer_carries_cors_date_and_its_length_and_no_server_header(call, gateway, upstream):
    r = await call("/openai/v1/files/file-abc", token=token("pinned@example.com"))
    assert r.code == 200
    assert r.headers["Access-Control-Allow-Origin"] == "*" and "X-AIPipe-Cost" in r.headers["Access-Control-Expose-Headers"]
    assert "Server" not in r.headers and r.headers["Date"].endswith(" GMT")
    assert int(r.headers["Content-Length"]) == len(r.body) > 0
    assert "Transfer-Encoding" not in r.headers


@pytest.mark.gen_test
async def test_a_204_answer_has_no_body_length_or_content_type(call, gateway, upstream):
    r = await call("/openai/v1/files/no-content", method="DELETE", token=token("pinned@example.com"))
    assert r.code == 204 and r.body == b""
    assert "Content-Type" not in r.headers and "Content-Length" not in r.headers
    assert r.headers["Access-Control-Allow-Origin"] == "*"
