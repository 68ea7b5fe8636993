"""The client for provider calls: connections kept open and reused (not once the provider closed them), and
answers that break off, arrive compressed or never arrive."""
from __future__ import annotations

import asyncio
import datetime
import gzip
import ipaddress
import re
import ssl
import time

import orjson
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from .conftest import token
from .fake_upstream import OPERATOR_KEYS
from .helpers import chat, spent


def peers(upstream) -> list:
    return [r["peer"] for r in upstream.state.requests]


@pytest.mark.gen_test
async def test_sequential_calls_reuse_one_connection(call, gateway, upstream):
    t = token("pool@example.com")
    for body in (chat(), chat(stream=True), chat(), chat(stream=True)):
        r = await call("/openai/v1/chat/completions", "POST", json=body, token=t)
        assert r.code == 200
    assert len(set(peers(upstream))) == 1
    assert await spent(gateway, "pool@example.com") == pytest.approx(4 * (12 * 0.15e-6 + 7 * 0.6e-6), abs=1e-12)


@pytest.mark.gen_test
async def test_connection_closed_by_the_provider_while_idle_is_not_reused(call, gateway, upstream):
    t = token("pool@example.com")
    assert (await call("/openai/v1/chat/completions", "POST", json=chat(), token=t)).code == 200
    await upstream.server.close_all_connections()  # the provider drops its idle keep-alive connections
    r = await call("/openai/v1/chat/completions", "POST", json=chat(), token=t)
    assert r.code == 200
    assert len(set(peers(upstream))) == 2


@pytest.mark.gen_test
async def test_error_answers_and_connection_close_answers_are_handled(call, gateway, upstream):
    t = token("pool@example.com")
    upstream.state.status = 500
    assert (await call("/openai/v1/chat/completions", "POST", json=chat(), token=t)).code == 500
    upstream.state.status = 200
    assert (await call("/openai/v1/chat/completions", "POST", json=chat(), token=t)).code == 200
    assert len(set(peers(upstream))) == 1


# -- a provider on a raw socket, for answers a well-behaved server would not give ------------------------------

MINI_IN, MINI_OUT = 0.15e-6, 0.6e-6  # gpt-4o-mini, USD per token
SSE_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"


def event(obj: dict) -> bytes:
    data = b"data: " + orjson.dumps(obj) + b"\n\n"
    return b"%x\r\n%s\r\n" % (len(data), data)


WORDS = b"".join(event({"id": "c", "choices": [{"index": 0, "delta": {"content": w}}], "usage": None})
                 for w in ("one ", "two "))
USAGE_EVENT = event({"id": "c", "choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": 7}})


class RawProvider:
    """Reads each request, writes answers[i] for the i-th connection (the last one for later connections), then
    closes the connection."""

    def __init__(self, *answers: bytes, delay: float = 0.0):
        self.answers, self.connections, self.delay = answers, 0, delay

    async def start(self) -> str:
        self.server = await asyncio.start_server(self.serve, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def serve(self, reader, writer) -> None:
        answer = self.answers[min(self.connections, len(self.answers) - 1)]
        self.connections += 1
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            await reader.readexactly(int(re.search(rb"(?i)content-length: *(\d+)", head).group(1)))
            await asyncio.sleep(self.delay)
            writer.write(answer)
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.TimeoutError):
            pass
        finally:
            writer.close()


async def through(make_gateway, serve, call, provider: RawProvider, body: dict, email: str):
    gw = await make_gateway(providers={"openai": {"base_url": await provider.start()}})
    r = await call(serve(gw) + "/openai/v1/chat/completions", "POST", json=body, token=token(email))
    return gw, r


async def cut_through(make_gateway, serve, provider: RawProvider, body: dict, email: str):
    """A stream the provider breaks off, read off the socket: (gateway, the chunked body's data, whether the answer
    was ended properly with its last chunk)."""
    gw = await make_gateway(providers={"openai": {"base_url": await provider.start()}})
    port = int(serve(gw).rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    payload = orjson.dumps(body)
    writer.write(b"POST /openai/v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Authorization: Bearer %s\r\nContent-Length: %d\r\n\r\n%s" % (token(email).encode(), len(payload), payload))
    raw = await asyncio.wait_for(reader.read(-1), 30)  # until the gateway closes the connection
    writer.close()
    head, _, rest = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"Transfer-Encoding: chunked" in head
    data, ended = b"", False
    while rest:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            ended = True
            break
        data, rest = data + rest[:size], rest[size + 2:]
    return gw, data, ended


@pytest.mark.gen_test
async def test_stream_cut_off_after_its_usage_is_billed_that_usage(make_gateway, serve, call, caplog):
    provider = RawProvider(SSE_HEAD + WORDS + USAGE_EVENT)  # no closing chunk: the provider went away
    gw, body, ended = await cut_through(make_gateway, serve, provider, chat(stream=True), "cut@example.com")
    assert b"two " in body and b'"choices":[]' not in body
    assert not ended  # the answer ends as the provider's did: cut, not complete
    assert await spent(gw, "cut@example.com") == pytest.approx(12 * MINI_IN + 7 * MINI_OUT, abs=1e-12)
    assert "broke off mid-answer" in caplog.text
    provider.server.close()


@pytest.mark.gen_test
async def test_stream_cut_off_before_usage_is_charged_the_estimate(make_gateway, serve, call):
    provider = RawProvider(SSE_HEAD + WORDS)
    body = chat(stream=True, max_tokens=100)
    gw, got, ended = await cut_through(make_gateway, serve, provider, body, "cut-early@example.com")
    assert b"two " in got and not ended
    prompt = len(orjson.dumps(body)) // 4  # estimated from the body as the app sent it
    charged = await spent(gw, "cut-early@example.com")
    assert charged > 0
    assert charged == pytest.approx(prompt * MINI_IN + 100 * MINI_OUT, abs=1e-12)
    provider.server.close()


@pytest.mark.gen_test
async def test_gzipped_answer_is_relayed_decoded_and_billed(make_gateway, serve, call):
    answer = orjson.dumps({"id": "c", "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}],
                           "usage": {"prompt_tokens": 12, "completion_tokens": 7}})
    packed = gzip.compress(answer)
    provider = RawProvider(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Encoding: gzip\r\n"
                           b"Content-Length: %d\r\n\r\n%s" % (len(packed), packed))
    gw, r = await through(make_gateway, serve, call, provider, chat(), "gzip@example.com")
    assert r.code == 200 and r.body == answer and "Content-Encoding" not in r.headers
    assert await spent(gw, "gzip@example.com") == pytest.approx(12 * MINI_IN + 7 * MINI_OUT, abs=1e-12)
    provider.server.close()


@pytest.mark.gen_test
async def test_provider_closing_before_answering_is_tried_once_more_then_502(make_gateway, serve, call):
    provider = RawProvider(b"")
    gw, r = await through(make_gateway, serve, call, provider, chat(), "closed@example.com")
    assert r.code == 502 and r.headers["Content-Type"].startswith("application/json")
    assert orjson.loads(r.body)["message"].startswith("Could not reach openai: ")
    assert provider.connections == 2
    assert await spent(gw, "closed@example.com") == 0
    provider.server.close()


@pytest.mark.gen_test
async def test_provider_closing_once_is_retried_and_answered(make_gateway, serve, call):
    answer = orjson.dumps({"id": "c", "choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": 7}})
    provider = RawProvider(b"", b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                           % (len(answer), answer))
    gw, r = await through(make_gateway, serve, call, provider, chat(), "retried@example.com")
    assert r.code == 200 and r.body == answer and provider.connections == 2
    assert await spent(gw, "retried@example.com") == pytest.approx(12 * MINI_IN + 7 * MINI_OUT, abs=1e-12)
    provider.server.close()


def self_signed(folder) -> tuple[str, str]:
    """A certificate for 127.0.0.1 that no trust store knows, and its key, as PEM files."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_path), str(key_path)


@pytest.mark.gen_test
async def test_provider_with_an_untrusted_certificate_never_gets_the_key(make_gateway, serve, call, tmp_path):
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*self_signed(tmp_path))
    received = []

    async def provider(reader, writer):
        try:
            received.append(await asyncio.wait_for(reader.read(65536), 5))
        except (ConnectionError, ssl.SSLError, asyncio.TimeoutError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(provider, "127.0.0.1", 0, ssl=context)
    port = server.sockets[0].getsockname()[1]
    gw = await make_gateway(providers={"openai": {"base_url": f"https://127.0.0.1:{port}"}})
    r = await call(serve(gw) + "/openai/v1/chat/completions", "POST", json=chat(), token=token("tls@example.com"))
    assert r.code == 502 and r.headers["Access-Control-Allow-Origin"] == "*"
    text = orjson.loads(r.body)["message"]
    assert text.startswith("Could not reach openai: ") and "certificate" in text.lower()
    assert not any(b"Authorization" in part or b"sk-" in part for part in received)  # no request was sent
    assert await spent(gw, "tls@example.com") == 0
    server.close()


@pytest.mark.gen_test
async def test_post_the_provider_dropped_after_taking_it_is_not_sent_again(make_gateway, serve, call):
    provider = RawProvider(b"", delay=0.8)  # took the request, worked on it, then went away
    gw, r = await through(make_gateway, serve, call, provider, chat(), "dropped@example.com")
    assert r.code == 502 and provider.connections == 1
    assert await spent(gw, "dropped@example.com") == 0
    provider.server.close()


@pytest.mark.gen_test
async def test_header_bytes_pass_through_unchanged_and_long_headers_fit(make_gateway, serve, call):
    answer = orjson.dumps({"id": "c", "choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": 7}})
    provider = RawProvider(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Note: caf\xc3\xa9\r\n"
                           b"X-Long: " + b"z" * 20000 + b"\r\nContent-Length: %d\r\n\r\n%s" % (len(answer), answer))
    gw, r = await through(make_gateway, serve, call, provider, chat(), "bytes@example.com")
    assert r.code == 200 and r.body == answer
    assert r.headers["X-Note"].encode("latin-1") == b"caf\xc3\xa9"  # Tornado reads header bytes as Latin-1
    assert r.headers["X-Long"] == "z" * 20000
    assert await spent(gw, "bytes@example.com") == pytest.approx(12 * MINI_IN + 7 * MINI_OUT, abs=1e-12)
    provider.server.close()


@pytest.mark.gen_test
async def test_malformed_answer_is_502_without_the_providers_address(make_gateway, serve, call, caplog):
    provider = RawProvider(b"HTTP/1.1 two hundred OK\r\n\r\n")
    url = await provider.start()
    gw = await make_gateway(providers={"openai": {"base_url": url + "/account-7731"}})
    r = await call(serve(gw) + "/openai/v1/chat/completions", "POST", json=chat(), token=token("bad@example.com"))
    assert r.code == 502
    text = orjson.loads(r.body)["message"]
    assert text == "Could not reach openai: the answer was not valid HTTP"
    assert "account-7731" not in r.body.decode() and "127.0.0.1" not in text
    assert "no answer from openai: ClientResponseError" in caplog.text  # the detail is in the log
    assert OPERATOR_KEYS["openai"] not in caplog.text and "Authorization" not in caplog.text
    provider.server.close()


@pytest.mark.gen_test(timeout=40)
async def test_client_that_stops_reading_cannot_hold_a_call_past_the_timeout(make_gateway, serve):
    big = event({"id": "c", "choices": [{"index": 0, "delta": {"content": "x" * 16000}}], "usage": None})
    closed = asyncio.Event()

    async def provider(reader, writer):
        try:
            await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            writer.write(SSE_HEAD)
            for _ in range(4000):  # at most 64 MB; the gateway stops reading long before
                writer.write(big)
                await asyncio.wait_for(writer.drain(), 10)
        except (ConnectionError, asyncio.TimeoutError, asyncio.IncompleteReadError):
            pass
        finally:
            closed.set()
            writer.close()

    server = await asyncio.start_server(provider, "127.0.0.1", 0)
    base_url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    gw = await make_gateway(providers={"openai": {"base_url": base_url}}, limits={"upstream_timeout": 2.0})
    host, port = serve(gw).split("//")[1].split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    body = orjson.dumps(chat(stream=True))
    writer.write(b"POST /openai/v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Authorization: Bearer %s\r\nContent-Length: %d\r\n\r\n%s"
                 % (token("stalled@example.com").encode(), len(body), body))
    await writer.drain()
    await reader.read(2000)  # the answer starts; then this client reads no more
    await asyncio.wait_for(closed.wait(), 15)  # the gateway let go of the provider (upstream_timeout)
    assert await spent(gw, "stalled@example.com") > 0  # and billed what was streamed
    writer.close()
    server.close()


@pytest.mark.gen_test
async def test_no_content_answer_with_a_json_type_is_relayed_as_such(make_gateway, serve, call):
    provider = RawProvider(b"HTTP/1.1 204 No Content\r\nContent-Type: application/json\r\n\r\n")
    gw = await make_gateway(providers={"openai": {"base_url": await provider.start()}})
    r = await call(serve(gw) + "/openai/v1/files/file-1", "DELETE", token=token("nc@example.com"))
    assert r.code == 204 and r.body == b""
    assert await spent(gw, "nc@example.com") == 0
    provider.server.close()


# -- upstream_timeout: one watchdog for all calls in flight ------------------------------------------------------
async def silent_provider() -> tuple[asyncio.AbstractServer, str]:
    """A provider that takes requests and never answers."""
    async def provider(reader, writer):
        await reader.read(65536)
        await asyncio.sleep(30)
        writer.close()

    server = await asyncio.start_server(provider, "127.0.0.1", 0)
    return server, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1/chat/completions"


async def ask(client, url: str, timeout: float):
    async def ignore(data: bytes) -> None:
        pass
    return await client.exchange("POST", url, {"Content-Type": "application/json"}, b"{}", connect_timeout=5,
                                 timeout=timeout, on_start=lambda *a: None, on_chunk=ignore)


@pytest.mark.gen_test(timeout=20)
async def test_calls_are_cut_at_their_own_deadline_and_leave_no_cancellation_behind():
    from aipipe.upstream import Upstream, describe, is_timeout
    server, url = await silent_provider()
    client = Upstream()
    try:
        async def timed(timeout: float):
            started = time.monotonic()
            error = await ask(client, url, timeout)
            took = time.monotonic() - started
            me = asyncio.current_task()
            still_waiting = [t for t in client._deadlines if t is not me and t not in client._cut]
            await asyncio.sleep(0.01)  # the task goes on: no cancellation is left pending on it
            return error, took, len(still_waiting), me.cancelling()

        (short, short_took, short_saw, left1), (long, long_took, long_saw, left2) = await asyncio.gather(
            timed(0.3), timed(2.0))
        for error in (short, long):
            assert is_timeout(error) and describe(error) == "no answer in time"
        assert short_took >= 0.3 and long_took >= 2.0  # neither ended before its deadline
        assert (short_saw, long_saw) == (1, 0)  # the short one ended while the long one still waited, uncut
        assert left1 == left2 == 0
        assert not client._deadlines and not client._cut
    finally:
        await client.close()
        server.close()


@pytest.mark.gen_test(timeout=20)
async def test_a_call_cancelled_from_outside_is_cancelled_not_timed_out():
    from aipipe.upstream import Upstream
    server, url = await silent_provider()
    client = Upstream()
    try:
        task = asyncio.ensure_future(ask(client, url, 0.5))
        await asyncio.sleep(0.2)
        task.cancel()  # a shutdown, say, before the deadline
        with pytest.raises(asyncio.CancelledError):
            await task
        # cancelled from outside in the same moment the watchdog cuts it: still a cancellation
        task = asyncio.ensure_future(ask(client, url, 30))
        await asyncio.sleep(0.2)
        client._deadlines[task] = 0.0  # due now
        client._watch(asyncio.get_running_loop())
        assert client._cut == {task}
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not client._deadlines and not client._cut
    finally:
        await client.close()
        server.close()


def test_the_watchdog_follows_the_client_to_a_new_event_loop():
    """A loop that ends right after a call leaves its watchdog behind: the next loop gets one of its own."""
    from aipipe.upstream import Upstream
    client = Upstream()

    async def timed_out_call() -> tuple[object, float]:
        server, url = await silent_provider()
        started = time.monotonic()
        try:
            return await asyncio.wait_for(ask(client, url, 0.3), 5), time.monotonic() - started
        finally:
            await client.close()
            server.close()

    for _ in range(2):  # each asyncio.run ends its loop at once, within the watchdog's 0.25 s
        error, took = asyncio.run(timed_out_call())
        assert isinstance(error, TimeoutError) and took >= 0.3  # the call's own deadline, not wait_for's


@pytest.mark.gen_test(timeout=20)
async def test_a_call_made_inside_another_keeps_the_earlier_deadline_and_cleans_up():
    from aipipe.upstream import Upstream
    server, silent = await silent_provider()
    client = Upstream()
    inner_errors = []
    try:
        async def on_chunk(data: bytes) -> None:  # the outer answer streams; each read makes a call of its own
            inner_errors.append(await ask(client, silent, 30))

        outer_provider = RawProvider(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                                     b"Transfer-Encoding: chunked\r\n\r\n6\r\ndata:1\r\n0\r\n\r\n")
        url = await outer_provider.start() + "/v1/chat/completions"
        started = time.monotonic()
        error = await client.exchange("POST", url, {}, b"{}", connect_timeout=5, timeout=0.5,
                                      on_start=lambda *a: None, on_chunk=on_chunk)
        assert error is None and time.monotonic() - started >= 0.5  # the inner call (30 s) ended at the outer deadline
        assert len(inner_errors) == 1 and isinstance(inner_errors[0], TimeoutError)
        assert not client._deadlines and not client._cut
    finally:
        await client.close()
        server.close()
