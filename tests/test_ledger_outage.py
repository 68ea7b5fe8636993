"""PostgreSQL connections lost mid-write: charges are billed exactly once, refusals are 503, and nobody is
left at the concurrency cap by holds of requests that never got an answer."""
from __future__ import annotations

import asyncio
import time
import uuid
from datetime import date

import pytest

from aipipe.budget import today_utc
from aipipe.storage import Charge

from .fake_upstream import arrived
from .test_postgres_outage import STORE_DOWN, USER, Calls, CuttableProxy, message, terminate_backends, until_ok
from .pg import fresh_postgres_url, with_port

DAY = date(2026, 1, 2)


class LosingProxy(CuttableProxy):
    """A proxy to Postgres that, once armed with a marker, forwards the client's message holding it and then
    drops the client's connection: the server runs (and commits) the statement, its answer never arrives."""

    marker: bytes | None = None
    late: asyncio.Event | None = None  # when given, the marked message reaches the server only once it is set
    answered: asyncio.Event | None = None  # set when the server answered the marked message

    async def _link(self, reader, writer) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        lost = asyncio.Event()

        async def to_server():
            try:
                while data := await reader.read(65536):
                    if self.marker and self.marker in data:
                        self.marker = None
                        lost.set()
                        if self.late is not None:  # the client gives up first; the message lands afterwards
                            writer.transport.abort()
                            await self.late.wait()
                        up_writer.write(data)
                        await up_writer.drain()
                        writer.transport.abort()
                        return
                    up_writer.write(data)
                    await up_writer.drain()
            except (OSError, asyncio.CancelledError):
                pass
            up_writer.transport.abort()

        async def to_client():
            try:
                while data := await up_reader.read(65536):
                    if lost.is_set():
                        if self.answered is not None:
                            self.answered.set()
                        break  # the server answered: the statement ran to its end
                    writer.write(data)
                    await writer.drain()
            except (OSError, asyncio.CancelledError):
                pass
            up_writer.transport.abort()
            writer.transport.abort()
        await asyncio.gather(to_server(), to_client())


@pytest.fixture
def pg_url(request):
    return fresh_postgres_url(request, f"t_{uuid.uuid4().hex[:12]}")


@pytest.fixture
def losing_proxy(io_loop):
    p = LosingProxy(("127.0.0.1", 5432))
    io_loop.run_sync(p.start)
    yield p
    p.server.close()
    io_loop.run_sync(lambda: asyncio.sleep(0.05))


def charge(cost: float, email: str) -> Charge:
    return Charge(email=email, day=DAY, cost=cost, provider="openai", model="gpt-4o-mini", ts=time.time())


async def ledger_sum(store, email: str) -> tuple[int, float]:
    rows = [r for r in await store.ledger(email, limit=100_000) if r["kind"] == "request"]
    return len(rows), sum(r["cost"] for r in rows)


@pytest.mark.gen_test(timeout=60)
async def test_a_settle_whose_answer_was_lost_is_retried_and_billed_once(make_gateway, pg_url, losing_proxy):
    email = "lost-reply@example.com"
    gw = await make_gateway(storage={"url": with_port(pg_url, "127.0.0.1", losing_proxy.port)})
    gw.ledger.retry_seconds = 0.1
    losing_proxy.marker = email.encode()  # first seen in the settle's arguments
    done = gw.ledger.settle(charge(0.125, email))
    gw.ledger.settle(charge(0.25, email))
    await asyncio.shield(done)
    assert losing_proxy.marker is None  # the answer to the first attempt was lost
    assert await ledger_sum(gw.store, email) == (2, pytest.approx(0.375, abs=1e-9))
    assert await gw.store.spend(email, DAY) == pytest.approx(0.375, abs=1e-9)


@pytest.mark.gen_test(timeout=90)
async def test_killing_the_connections_while_charges_are_written_bills_each_once(make_gateway, pg_url):
    app_name = "aipipe_" + uuid.uuid4().hex[:10]
    email = "killed@example.com"
    gw = await make_gateway(storage={"url": f"{pg_url}&application_name={app_name}"})
    gw.ledger.retry_seconds = 0.05
    made = []

    async def charge_steadily():
        for i in range(400):
            cost = 0.000123 * (i % 17 + 1)
            gw.ledger.settle(charge(cost, email))
            made.append(cost)
            await asyncio.sleep(0.002)

    async def kill_repeatedly():
        killed = 0
        for _ in range(15):
            await asyncio.sleep(0.05)
            killed += await terminate_backends(app_name)
        return killed
    _, killed = await asyncio.gather(charge_steadily(), kill_repeatedly())
    assert killed >= 1
    await gw.ledger.flush(timeout=30)
    count, total = await ledger_sum(gw.store, email)
    assert count == len(made)
    assert total == pytest.approx(sum(made), abs=1e-9)
    assert await gw.store.spend(email, DAY) == pytest.approx(sum(made), abs=1e-9)


@pytest.mark.gen_test(timeout=90)
async def test_refusals_while_the_store_is_away_are_503_and_nobody_stays_at_the_cap(
        make_gateway, serve, upstream, pg_url, proxy):
    url = with_port(pg_url, "127.0.0.1", proxy.port) + "&connect_timeout=2"
    gw = await make_gateway(storage={"url": url}, limits={"max_concurrent_per_user": 1})
    gw.ledger.retry_seconds = 2.0
    calls = Calls(serve(gw))
    upstream.state.gate = asyncio.Event()  # the first call stays upstream until the store is away
    in_flight = asyncio.ensure_future(calls.chat())  # holds the user's only slot
    await arrived(upstream.state, 1)  # admitted: it reached the provider
    await proxy.cut()
    down = await calls.chat()
    assert down.code == 503 and message(down) == STORE_DOWN
    upstream.state.gate.set()
    assert (await in_flight).code == 200  # finished while the store is away: its hold is released late
    await proxy.restore()
    await until_ok(calls)  # never "Too many requests in flight"
    await gw.ledger.flush()
    assert await gw.store.open_holds(USER, time.time()) == 0


@pytest.mark.gen_test(timeout=60)
@pytest.mark.parametrize("late", [False, True, None], ids=["commit-lands-first", "release-sent-first", "never"])
async def test_holds_of_an_admission_whose_commit_answer_was_lost_are_released(
        late, make_gateway, serve, upstream, pg_url, losing_proxy):
    """The COMMIT of an admission is sent but its answer is lost: the call is 503 and its hold released, whether the
    commit lands before the release is sent or only after (the release must then wait for it, not pass over a
    row it cannot see yet), or never arrives (the server ends the transaction left idle, rather than it holding
    the release, and with it every charge, for as long as the connection lingers), so the hold never counts as a
    call in flight."""
    url = with_port(pg_url, "127.0.0.1", losing_proxy.port) + "&command_timeout=2"
    gw = await make_gateway(storage={"url": url}, limits={"max_concurrent_per_user": 1})
    gw.ledger.retry_seconds = 0.1
    calls = Calls(serve(gw))
    assert (await calls.chat()).code == 200
    if late is not False:  # the client sees the connection drop before the server gets the COMMIT, if ever
        losing_proxy.late, losing_proxy.answered = asyncio.Event(), asyncio.Event()
    losing_proxy.marker = b"COMMIT"
    lost = await calls.chat()
    assert lost.code == 503 and message(lost) == STORE_DOWN
    if late:
        releasing = asyncio.ensure_future(gw.ledger.flush())  # the release goes while the transaction is open
        await asyncio.wait([releasing], timeout=1.0)
        losing_proxy.late.set()  # only now does the admission's transaction commit
        await losing_proxy.answered.wait()
        await releasing
    assert losing_proxy.marker is None
    await until_ok(calls)  # the orphan hold must not count as a call in flight
    await gw.ledger.flush()
    assert await gw.store.open_holds(USER, time.time()) == 0
    assert await gw.store.spend(USER, today_utc()) > 0


@pytest.fixture
def proxy(io_loop):
    p = CuttableProxy(("127.0.0.1", 5432))
    io_loop.run_sync(p.start)
    yield p
    if p.server is not None:
        p.server.close()
    for w in list(p.links):
        w.transport.abort()
    io_loop.run_sync(lambda: asyncio.sleep(0.05))
