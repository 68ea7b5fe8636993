"""SIGTERM lets open calls finish and bills every one; calls still open at the deadline are cut and billed."""
from __future__ import annotations

import asyncio
import signal

import orjson
import pytest
from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest

from .conftest import base_config, token
from .fake_upstream import arrived
from .helpers import chat, sse_data
from .server_process import ServerProcess

MINI_IN, MINI_OUT = 0.15e-6, 0.6e-6  # gpt-4o-mini, USD per token


@pytest.fixture
def server(tmp_path, upstream):
    """make(**sections) -> a started-to-be ServerProcess pointed at the fake provider; killed at teardown."""
    made = []

    def make(**sections) -> ServerProcess:
        data = base_config(upstream.url, f"sqlite:///{tmp_path}/aipipe.db")
        for section, values in sections.items():
            data[section] = {**data.get(section, {}), **values}
        proc = ServerProcess(str(tmp_path), data)
        made.append(proc)
        proc.start()
        return proc
    yield make
    for proc in made:
        proc.kill()


def stream_call(url: str, email: str, seen: list) -> asyncio.Future:
    """A streamed chat call; `seen` gets a True when its first bytes arrive."""
    def first_bytes(chunk: bytes) -> None:
        if not seen or seen[-1] is not email:
            seen.append(email)
        chunks.append(chunk)
    chunks: list[bytes] = []
    request = HTTPRequest(url + "/openai/v1/chat/completions", method="POST", body=orjson.dumps(chat(stream=True)),
                          headers={"Authorization": f"Bearer {token(email)}", "Content-Type": "application/json"},
                          streaming_callback=first_bytes, request_timeout=60)

    async def run():
        try:
            response = await AsyncHTTPClient(force_instance=True).fetch(request, raise_error=False)
        except (OSError, HTTPClientError) as e:  # cut by the server mid-answer
            return 0, b"".join(chunks), e
        return response.code, b"".join(chunks), response.error
    return asyncio.ensure_future(run())


async def until(predicate, seconds: float = 30.0) -> None:
    for _ in range(int(seconds / 0.02)):
        if predicate():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not reached in time")


async def refused(port: int, tries: int = 100) -> bool:
    """Whether a connect to port came to be refused, trying every 0.05 s (bounded); a connect that is taken,
    before the server has handled its signal, is closed at once."""
    for _ in range(tries):
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            return True
        writer.close()
        await asyncio.sleep(0.05)
    return False


@pytest.mark.gen_test(timeout=120)
async def test_sigterm_lets_open_streams_finish_and_bills_every_one(server, upstream):
    upstream.state.event_delay = 0.3  # each stream takes about 1.2 s
    proc = server()
    await proc.ready()
    users = [f"s{i}@example.com" for i in range(10)]
    seen: list = []
    calls = [stream_call(proc.url, email, seen) for email in users]
    await until(lambda: len(set(seen)) == len(users))  # every stream is open and relaying
    proc.signal(signal.SIGTERM)
    results = await asyncio.gather(*calls)
    for code, body, error in results:
        assert code == 200, error
        assert body.rstrip().endswith(b"data: [DONE]")  # finished, not cut
        assert "".join(c["choices"][0]["delta"].get("content") or "" for c in sse_data(body) if c["choices"])
    assert await proc.exited() == 0
    rows = proc.ledger()
    assert sorted(r["email"] for r in rows) == users
    for r in rows:
        assert r["cost"] == pytest.approx(12 * MINI_IN + 7 * MINI_OUT, abs=1e-12) and not r["aborted"]
    assert "Traceback" not in proc.log()


@pytest.mark.gen_test(timeout=120)
async def test_no_new_connections_are_taken_once_draining(server, upstream):
    upstream.state.gate = asyncio.Event()  # the provider holds its answer: the call stays open, the server draining
    proc = server()
    await proc.ready()
    open_call = stream_call(proc.url, "first@example.com", [])
    await arrived(upstream.state, 1)
    proc.signal(signal.SIGTERM)
    try:
        assert await refused(proc.port)  # the listening socket is closed
    finally:
        upstream.state.gate.set()
    code, body, _ = await open_call
    assert code == 200 and body.rstrip().endswith(b"data: [DONE]")
    assert await proc.exited() == 0


@pytest.mark.gen_test(timeout=120)
async def test_streams_open_at_the_drain_deadline_are_cut_and_billed_their_estimate(server, upstream):
    upstream.state.event_delay = 5.0  # far longer than the drain
    upstream.state.events = 4
    proc = server(server={"drain_seconds": 0.5})
    await proc.ready()
    users = [f"cut{i}@example.com" for i in range(3)]
    seen: list = []
    calls = [stream_call(proc.url, email, seen) for email in users]
    await until(lambda: len(set(seen)) == len(users))
    proc.signal(signal.SIGTERM)
    results = await asyncio.gather(*calls)
    assert await proc.exited() == 0
    for code, body, error in results:
        assert code == 0 and body and not body.rstrip().endswith(b"data: [DONE]"), error  # cut off mid-answer
    rows = proc.ledger()
    assert sorted(r["email"] for r in rows) == users
    body_bytes = len(orjson.dumps(chat(stream=True)))
    for r in rows:
        # no usage was reported before the cut: billed at least the smallest estimate there is (the prompt)
        assert r["cost"] >= body_bytes // 4 * MINI_IN and r["aborted"] and r["streamed"]
    assert "cut 3 calls still open" in proc.log()


@pytest.mark.gen_test(timeout=120)
async def test_a_similarity_call_whose_client_left_is_still_billed_across_a_sigterm(server, upstream):
    upstream.state.delay = 1.5  # the embeddings answer comes after the client left and SIGTERM arrived
    proc = server()
    await proc.ready()
    body = orjson.dumps({"docs": ["alpha", "beta"], "topics": ["gamma"]})
    reader, writer = await asyncio.open_connection("127.0.0.1", proc.port)
    writer.write(f"POST /similarity HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token('gone@example.com')}\r\n"
                 f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
    await writer.drain()
    await until(lambda: len(upstream.state.requests) == 1)  # the gateway has asked the provider
    writer.close()  # the client leaves
    proc.signal(signal.SIGTERM)
    assert await proc.exited() == 0
    rows = proc.ledger()
    assert [(r["email"], r["provider"]) for r in rows] == [("gone@example.com", "openai")]
    assert rows[0]["cost"] > 0
