"""Postgres going away at runtime: 503 with a clear message, the server keeps serving, the pool
recovers by itself, and a settlement pending during the outage is written afterwards.

The machine's shared cluster is never stopped: the store reaches Postgres through a TCP proxy run
in the test's loop that the test can cut (every connection dropped, new ones refused) and restore,
or the test kills the pool's server processes with pg_terminate_backend.
"""
from __future__ import annotations

import asyncio
import time
import uuid

import asyncpg
import orjson
import pytest
from tornado.httpclient import AsyncHTTPClient, HTTPRequest

from aipipe.budget import today_utc

from .conftest import POSTGRES_URL, token
from .fake_upstream import arrived
from .helpers import chat, settled
from .pg import fresh_postgres_url, with_port
from .test_budget_concurrency import Instances

STORE_DOWN = "Usage store unavailable, try again shortly"
USER = "outage@example.com"


class CuttableProxy:
    """A loopback TCP proxy to Postgres that can be cut and restored on the same port."""

    def __init__(self, target: tuple[str, int]):
        self.target = target
        self.port = 0
        self.server: asyncio.base_events.Server | None = None
        self.links: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._link, "127.0.0.1", self.port, reuse_address=True)
        self.port = self.server.sockets[0].getsockname()[1]

    async def cut(self) -> None:
        """Refuse new connections and drop every open one (as a crashed or restarting server does)."""
        self.server.close()
        for w in list(self.links):
            w.transport.abort()
        self.links.clear()
        await asyncio.sleep(0.05)

    async def restore(self) -> None:
        await self.start()

    async def _link(self, reader, writer) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self.links |= {writer, up_writer}

        async def pipe(src, dst):
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (OSError, asyncio.CancelledError):
                pass
            finally:
                dst.transport.abort()
                self.links.discard(dst)
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))


@pytest.fixture
def pg_url(request):
    return fresh_postgres_url(request, f"t_{uuid.uuid4().hex[:12]}")


@pytest.fixture
def proxy(io_loop):
    p = CuttableProxy(("127.0.0.1", 5432))
    io_loop.run_sync(p.start)
    yield p
    if p.server is not None:
        p.server.close()
    for w in list(p.links):
        w.transport.abort()
    io_loop.run_sync(lambda: asyncio.sleep(0.05))  # let the relay tasks see their sockets close


class Calls:
    def __init__(self, base: str):
        self.base = base
        self.http = AsyncHTTPClient(force_instance=True, max_clients=50)

    async def chat(self, auth: str | None = None, timeout: float = 30):
        req = HTTPRequest(self.base + "/openai/v1/chat/completions", method="POST", body=orjson.dumps(chat()),
                          headers={"Authorization": f"Bearer {auth or token(USER)}", "Content-Type": "application/json"},
                          request_timeout=timeout)
        return await self.http.fetch(req, raise_error=False)

    async def usage(self):
        req = HTTPRequest(self.base + "/usage", headers={"Authorization": f"Bearer {token(USER)}"}, request_timeout=30)
        return await self.http.fetch(req, raise_error=False)


def message(r) -> str:
    return orjson.loads(r.body)["message"]


async def until_ok(calls: Calls, tries: int = 150):
    """Retry a chat call until it is 200; every failure on the way must be the 503 (never a 429: nobody is left
    at a cap by holds of calls that never got an answer)."""
    for _ in range(tries):
        r = await calls.chat()
        if r.code == 200:
            return r
        assert r.code == 503 and message(r) == STORE_DOWN, (r.code, r.body)
        await asyncio.sleep(0.1)
    raise AssertionError("the store did not recover by itself")


@pytest.mark.gen_test(timeout=90)
async def test_outage_answers_503_keeps_serving_recovers_and_loses_no_cost(make_gateway, serve, upstream, pg_url, proxy):
    url = with_port(pg_url, "127.0.0.1", proxy.port) + "&connect_timeout=2"
    gw = await make_gateway(storage={"url": url})
    calls = Calls(serve(gw))
    costs = []
    first = await calls.chat()
    assert first.code == 200
    costs.append(float(first.headers["X-AIPipe-Cost"]))

    upstream.state.gate = asyncio.Event()  # holds the call upstream: admitted now, settled during the outage
    in_flight = asyncio.ensure_future(calls.chat())
    await arrived(upstream.state, 2)  # admitted: it reached the provider
    await proxy.cut()

    down = await calls.chat()  # answered while the database is still down, not held until it is back
    assert down.code == 503 and message(down) == STORE_DOWN
    usage = await calls.usage()
    assert usage.code == 503 and message(usage) == STORE_DOWN
    upstream.state.gate.set()  # the call in flight finishes while the database is away
    native = await calls.chat(auth="sk-user-native-key")  # needs no store: still served
    assert native.code == 200, native.body

    finished = await in_flight
    assert finished.code == 200  # the user got the answer; the charge waits in the ledger
    costs.append(float(finished.headers["X-AIPipe-Cost"]))
    await asyncio.sleep(1.5)  # a few failed retries
    assert gw.ledger.pending >= 1
    assert len(await asyncio.gather(*(calls.chat() for _ in range(5)))) == 5  # still serving (503s)

    await proxy.restore()
    back = await until_ok(calls)
    costs.append(float(back.headers["X-AIPipe-Cost"]))
    await settled(gw, timeout=10)
    rows = [r for r in await gw.store.ledger(USER, limit=100) if r["kind"] == "request"]
    assert len(rows) == 3  # before, during (written late) and after the outage
    assert sum(r["cost"] for r in rows) == pytest.approx(sum(costs))
    assert await gw.store.spend(USER, today_utc()) == pytest.approx(sum(costs))
    assert await gw.store.open_holds(USER, time.time()) == 0  # the pending hold was released too
    u = await calls.usage()
    assert u.code == 200 and orjson.loads(u.body)["spent"] == pytest.approx(sum(costs))


async def terminate_backends(application_name: str) -> int:
    conn = await asyncpg.connect(POSTGRES_URL)
    try:
        return await conn.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = $1",
            application_name)
    finally:
        await conn.close()


@pytest.mark.gen_test(timeout=90)
async def test_pool_recovers_after_its_connections_are_killed(make_gateway, serve, upstream, pg_url):
    app_name = "aipipe_" + uuid.uuid4().hex[:10]
    gw = await make_gateway(storage={"url": f"{pg_url}&application_name={app_name}"},
                            limits={"max_concurrent_per_user": 0})
    calls = Calls(serve(gw))
    await asyncio.gather(*(calls.chat() for _ in range(10)))  # open several pool connections
    await settled(gw)
    ok = 10
    for _ in range(3):
        upstream.state.gate = asyncio.Event()  # the five stay upstream until the pool's connections are killed
        seen = len(upstream.state.requests)
        pending = asyncio.ensure_future(asyncio.gather(*(calls.chat() for _ in range(5))))
        await arrived(upstream.state, seen + 5)  # all five admitted; their charges are still to be written
        assert await terminate_backends(app_name) >= 1
        upstream.state.gate.set()
        done = await pending
        assert {r.code for r in done} == {200}
        ok += 5
        await until_ok(calls)
        ok += 1
    await settled(gw, timeout=10)
    rows = [r for r in await gw.store.ledger(USER, limit=1000) if r["kind"] == "request"]
    assert len(rows) == ok


@pytest.mark.gen_test(timeout=120)
async def test_server_process_survives_an_outage(tmp_path, upstream, pg_url, proxy):
    instances = Instances(tmp_path, with_port(pg_url, "127.0.0.1", proxy.port) + "&connect_timeout=2")
    try:
        (base,) = await instances.start(upstream.url, {"max_concurrent_per_user": 8}, {"*": {"limit": 1.0, "days": 7}}, n=1)
        calls = Calls(base)
        assert (await calls.chat()).code == 200
        await proxy.cut()
        for _ in range(5):
            r = await calls.chat()
            assert r.code == 503 and message(r) == STORE_DOWN
        await asyncio.sleep(2)
        assert instances.procs[0].poll() is None  # still running
        await proxy.restore()
        await until_ok(calls)
    finally:
        await instances.astop()
    logs = instances.logs()
    assert instances.procs[0].returncode == 0, logs
    assert "Traceback" not in logs and "spooled" not in logs, logs  # every charge was written before exit
