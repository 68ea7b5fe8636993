"""What a client can make the server hold: bodies, connections, half-sent requests, accept() failures."""
from __future__ import annotations

import asyncio
import errno
import logging
import socket
import time

import orjson
import pytest
import tornado.testing

from aipipe.listener import PAUSE_SECONDS, GatewayHTTPServer
from aipipe.server import make_app, make_server

from .conftest import token
from .helpers import chat, raw_request, spent, tracebacks

LIMIT = 4096


async def exchange(port: int, head: bytes, *chunks: bytes) -> bytes:
    """Send head and chunks on a fresh connection, then read until the server closes it (bounded)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head)
    for chunk in chunks:
        writer.write(chunk)
        await writer.drain()
    try:
        return await asyncio.wait_for(reader.read(-1), 30)
    finally:
        writer.close()


def status_and_json(answer: bytes) -> tuple[int, dict, bytes]:
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body


@pytest.fixture
def limited(io_loop, make_gateway, serve):
    """A server for a gateway whose bodies are limited to LIMIT bytes: its port."""
    gw = io_loop.run_sync(lambda: make_gateway(server={"max_body_bytes": LIMIT}))
    return gw, int(serve(gw).rsplit(":", 1)[1])


@pytest.mark.gen_test
@pytest.mark.parametrize("path", ["/openai/v1/chat/completions", "/similarity", "/admin/cost", "/proxy/https://example.com/"])
async def test_a_declared_oversize_body_is_413_json_before_any_of_it_is_sent(limited, path, upstream):
    gw, port = limited
    head = (f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token('big@example.com')}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {50 * 1024 * 1024}\r\n\r\n").encode()
    status, headers, body = status_and_json(await exchange(port, head))  # the server answers and closes
    assert status == 413
    assert orjson.loads(body) == {"message": f"Request body is larger than this server accepts ({LIMIT} bytes)"}
    assert headers["access-control-allow-origin"] == "*"
    assert upstream.state.requests == []


@pytest.mark.gen_test
async def test_a_chunked_body_is_cut_at_the_limit_with_413(limited, upstream):
    gw, port = limited
    head = (f"POST /openai/v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token('big@example.com')}\r\n"
            "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n").encode()
    piece = b"x" * 1000
    chunks = [b"%x\r\n%s\r\n" % (len(piece), piece)] * 8
    status, headers, body = status_and_json(await exchange(port, head, *chunks))
    assert status == 413 and orjson.loads(body)["message"].startswith("Request body is larger")
    assert upstream.state.requests == []
    assert await spent(gw, "big@example.com") == 0.0


@pytest.mark.gen_test
async def test_a_body_within_the_limit_is_served(limited, upstream):
    gw, port = limited
    r = await raw_request(f"http://127.0.0.1:{port}", "POST", "/openai/v1/chat/completions",
                          {"Authorization": f"Bearer {token('ok@example.com')}", "Content-Type": "application/json"},
                          orjson.dumps(chat()))
    assert r[0] == 200 and upstream.state.last["path"] == "/v1/chat/completions"


@pytest.mark.gen_test
@pytest.mark.parametrize(("auth", "message"), [
    ("", "Missing Authorization: Bearer token"), ("Bearer not-a-token", "Bearer token is invalid")])
async def test_a_provider_call_without_a_good_token_is_refused_on_its_headers(auth, message, call, http_server, base_url,
                                                                              upstream):
    port = int(base_url.rsplit(":", 1)[1])
    head = ("POST /openai/v1/audio/transcriptions HTTP/1.1\r\nHost: x\r\n" + (f"Authorization: {auth}\r\n" if auth else "")
            + "Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 20000000\r\n\r\n").encode()
    status, headers, body = status_and_json(await exchange(port, head))  # no byte of the 20 MB is ever sent
    assert status == 401 and orjson.loads(body) == {"message": message}
    assert headers["access-control-allow-origin"] == "*"
    r = await call("/openai/v1/chat/completions", "POST", json=chat(), token=token("next@example.com"))
    assert r.code == 200  # and the server goes on serving


@pytest.fixture
def bounded_server(io_loop, make_gateway):
    """start(**server_settings) -> port of a GatewayHTTPServer (the one `aipipe serve` runs) for a new gateway."""
    servers = []

    async def start(**settings):
        gw = await make_gateway(server=settings)
        server = make_server(make_app(gw), gw.config)
        sock, port = tornado.testing.bind_unused_port()
        server.add_sockets([sock])
        servers.append(server)
        return port
    yield start
    for server in servers:
        server.stop()


@pytest.mark.gen_test
async def test_at_the_cap_the_longest_waiting_half_sent_request_makes_room(bounded_server, upstream):
    port = await bounded_server(max_connections=3)
    held = []
    for _ in range(3):  # half-sent requests, as a slow client (or an attacker) leaves them
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /usage HTTP/1.1\r\nHost: x\r\n")
        held.append((reader, writer))
        await asyncio.sleep(0.02)  # accepted in this order
    status, _, _ = status_and_json(await exchange(port, b"GET /nowhere HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"))
    assert status == 404  # served, not locked out
    assert await asyncio.wait_for(held[0][0].read(-1), 30) == b""  # the oldest waiting one was closed
    for _, writer in held:
        writer.close()


@pytest.mark.gen_test
async def test_connections_over_the_cap_get_a_503_when_every_one_is_mid_request(bounded_server, upstream):
    upstream.state.event_delay = 0.3
    port = await bounded_server(max_connections=2)
    head = (f"POST /openai/v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token('busy@example.com')}\r\n"
            "Content-Type: application/json\r\nConnection: close\r\n").encode()
    body = orjson.dumps(chat(stream=True))
    streams = [asyncio.ensure_future(exchange(port, head + b"Content-Length: %d\r\n\r\n" % len(body) + body))
               for _ in range(2)]
    for _ in range(1500):  # until both calls reached the provider
        if len(upstream.state.requests) == 2:
            break
        await asyncio.sleep(0.02)
    status, headers, answer = status_and_json(await exchange(port, b"GET /usage HTTP/1.1\r\nHost: x\r\n\r\n"))
    assert status == 503 and orjson.loads(answer)["message"].startswith("Server busy")
    assert headers["access-control-allow-origin"] == "*"
    for done in await asyncio.gather(*streams):  # the calls in progress were not disturbed
        assert done.startswith(b"HTTP/1.1 200") and b"data: [DONE]" in done


@pytest.mark.gen_test
async def test_a_half_sent_request_is_closed_after_idle_seconds(bounded_server, upstream):
    port = await bounded_server(idle_seconds=0.2)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /usage HTTP/1.1\r\nHost: x\r\nX-Slow: ")  # and nothing more
    try:
        assert await asyncio.wait_for(reader.read(-1), 30) == b""  # closed by the server, not answered
    finally:
        writer.close()


@pytest.mark.gen_test
async def test_a_body_sent_slower_than_body_seconds_is_cut(bounded_server, upstream):
    port = await bounded_server(body_seconds=0.5)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write((f"POST /openai/v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token('slow@example.com')}"
                  "\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"model\"").encode())
    try:
        assert await asyncio.wait_for(reader.read(-1), 30) == b""  # closed, the rest of the body never waited for
    finally:
        writer.close()
    assert upstream.state.requests == []
    status, _, _ = status_and_json(await exchange(port, b"GET /nowhere HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"))
    assert status == 404  # and the server goes on serving


@pytest.mark.gen_test
async def test_an_error_answer_leaves_the_next_request_on_its_connection_alone(bounded_server, upstream):
    upstream.state.event_delay = 0.4  # a stream that outlives body_seconds
    port = await bounded_server(body_seconds=0.5)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    auth = f"Authorization: Bearer {token('keepalive@example.com')}\r\nContent-Type: application/json\r\n"
    try:
        bad = orjson.dumps(chat("no-such-model"))
        writer.write(f"POST /openai/v1/chat/completions HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: {len(bad)}"
                     f"\r\n\r\n".encode() + bad)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
        assert head.startswith(b"HTTP/1.1 400")
        length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
        await reader.readexactly(length)
        good = orjson.dumps(chat(stream=True))  # the same connection, kept alive, as SDKs pool it
        writer.write(f"POST /openai/v1/chat/completions HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n"
                     f"Content-Length: {len(good)}\r\n\r\n".encode() + good)
        answer = await asyncio.wait_for(reader.read(-1), 30)
        assert answer.startswith(b"HTTP/1.1 200") and b"data: [DONE]" in answer  # not cut by the body sweep
    finally:
        writer.close()


class FlakySocket(socket.socket):
    """A listening socket whose accept() fails as a process out of file descriptors does, while `failing`."""

    failing = True
    accepts = 0

    def accept(self):
        type(self).accepts += 1
        if self.failing:
            raise OSError(errno.EMFILE, "Too many open files")
        return super().accept()


@pytest.mark.gen_test
async def test_running_out_of_descriptors_pauses_accepting_with_one_log_line(make_gateway, upstream, caplog):
    FlakySocket.accepts = 0
    gw = await make_gateway()
    server = GatewayHTTPServer(make_app(gw))
    sock = FlakySocket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    sock.setblocking(False)
    port = sock.getsockname()[1]
    server.add_sockets([sock])
    try:
        with caplog.at_level(logging.WARNING, logger="aipipe"):
            started = time.monotonic()
            pending = asyncio.ensure_future(raw_request(f"http://127.0.0.1:{port}", "GET", "/nowhere"))
            await asyncio.sleep(1.2)  # two pauses' worth of a listening socket that stays readable
            failures, took = FlakySocket.accepts, time.monotonic() - started
            FlakySocket.failing = False
            status, _, _ = await asyncio.wait_for(pending, 30)  # served once descriptors are back
    finally:
        server.stop()
        FlakySocket.failing = True
    assert status == 404
    # a pause after each failure, not a busy loop of tracebacks: at most one try per pause in the time that passed
    # (however long a loaded machine made the sleep)
    assert 1 <= failures <= took / PAUSE_SECONDS + 2
    lines = [r for r in caplog.records if "accepting connections failed" in r.getMessage()]
    assert len(lines) == 1 and lines[0].exc_info is None
    assert tracebacks(caplog.records) == []
