"""One contract for every storage backend: each test runs against SQLite and against PostgreSQL.

The `store_kind` fixture is parametrised by conftest over both backends; `store_url` gives each
test a fresh database (a SQLite file, or a Postgres schema of its own).
"""
from __future__ import annotations

import asyncio
import importlib
import time
from collections import defaultdict
from datetime import date, timedelta

import pytest

from aipipe.storage import Charge, HoldRequest, RowRefused, StoreUnavailable, open_store
from aipipe.budget import RATE_WINDOW

D0 = date(2025, 3, 10)
NOW = 1_750_000_000.0


@pytest.fixture
def store(io_loop, store_kind, store_url):
    s = io_loop.run_sync(lambda: open_store(store_url))
    yield s
    io_loop.run_sync(s.close)


@pytest.fixture
def more_stores(io_loop, store_kind, store_url):
    """open(n) -> n more stores on the same database (opened, closed at teardown)."""
    opened = []

    async def open_n(n: int):
        stores = await asyncio.gather(*(open_store(store_url) for _ in range(n)))
        opened.extend(stores)
        return stores
    yield open_n

    async def close_all():
        for s in opened:
            await s.close()
    io_loop.run_sync(close_all)


async def sql(store, query: str) -> list[tuple]:
    """Run a parameterless query on either backend (for checks the interface does not expose)."""
    if store.url.startswith("sqlite"):
        return [tuple(r) for r in await store._db.execute_fetchall(query)]
    async with store._pool.acquire() as conn:
        return [tuple(r) for r in await conn.fetch(query)]


def hold(email="u@example.com", amount=0.25, since=D0, limit=1.0, **kw) -> HoldRequest:
    return HoldRequest(email=email, amount=amount, since=since, limit=limit, **kw)


def charge(admission=None, email="u@example.com", cost=0.1, day=D0, **kw) -> Charge:
    return Charge(email=email, day=day, cost=cost, hold_id=admission.hold_id if admission else None, **kw)


# --- reserve: budget ------------------------------------------------------------------------

@pytest.mark.gen_test
async def test_reserve_admits_while_spend_plus_holds_and_its_own_hold_fit_the_limit(store):
    got = await store.reserve([hold(amount=0.25) for _ in range(5)], NOW)
    assert [a.refused for a in got] == [None, None, None, None, "budget"]  # 4 x 0.25 is exactly the limit
    assert [a.held for a in got] == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])
    assert all(a.hold_id is not None for a in got[:4]) and got[4].hold_id is None
    assert len({a.hold_id for a in got[:4]}) == 4
    assert got[4].spent == 0
    assert await store.open_holds("u@example.com", NOW) == pytest.approx(1.0)


@pytest.mark.gen_test
async def test_holds_count_across_separate_reserve_calls_and_users_are_separate(store):
    for _ in range(3):
        await store.reserve([hold(amount=0.3)], NOW)
    (refused,) = await store.reserve([hold(amount=0.3)], NOW)  # 0.9 held + 0.3 > 1.0
    assert refused.refused == "budget" and refused.held == pytest.approx(0.9)
    (other,) = await store.reserve([hold(email="v@example.com", amount=0.3)], NOW)
    assert other.refused is None and other.held == 0


@pytest.mark.gen_test
async def test_settled_spend_counts_and_a_call_a_cent_under_the_limit_is_admitted_only_if_it_fits(store):
    await store.settle([charge(cost=0.99)])
    (big,) = await store.reserve([hold(amount=5.0)], NOW)  # could cost more than the cent left
    assert big.refused == "budget" and big.spent == pytest.approx(0.99) and big.held == 0
    (a,) = await store.reserve([hold(amount=0.01)], NOW)
    assert a.refused is None and a.spent == pytest.approx(0.99)
    (b,) = await store.reserve([hold(amount=0.001)], NOW)
    assert b.refused == "budget" and b.spent == pytest.approx(0.99) and b.held == pytest.approx(0.01)


@pytest.mark.gen_test
async def test_budget_window_only_counts_days_from_since(store):
    await store.settle([charge(cost=0.96, day=D0 - timedelta(days=3)), charge(cost=0.05, day=D0)])
    (a,) = await store.reserve([hold(since=D0 - timedelta(days=1), amount=0.01)], NOW)
    assert a.refused is None and a.spent == pytest.approx(0.05)
    (b,) = await store.reserve([hold(since=D0 - timedelta(days=3), amount=0.01)], NOW)
    assert b.refused == "budget" and b.spent == pytest.approx(1.01)
    # a batch mixing windows: each request judged on its own window
    got = await store.reserve([hold(since=D0, amount=0.01), hold(since=D0 - timedelta(days=6), amount=0.01)], NOW)
    assert [g.refused for g in got] == [None, "budget"]
    assert await store.spend("u@example.com", D0) == pytest.approx(0.05)
    assert await store.spend("u@example.com", D0 - timedelta(days=7)) == pytest.approx(1.01)


@pytest.mark.gen_test
async def test_zero_limit_refuses_everything(store):
    (a,) = await store.reserve([hold(limit=0.0, amount=0.0)], NOW)
    assert a.refused == "budget" and a.hold_id is None


# --- reserve: concurrency and rate -------------------------------------------------------------

@pytest.mark.gen_test
async def test_concurrency_cap_counts_open_holds_and_frees_on_settle(store):
    got = await store.reserve([hold(amount=0.01, max_inflight=2) for _ in range(3)], NOW)
    assert [a.refused for a in got] == [None, None, "concurrency"]
    assert got[2].retry_after >= 1
    (again,) = await store.reserve([hold(amount=0.01, max_inflight=2)], NOW + 1)
    assert again.refused == "concurrency"
    await store.settle([charge(got[0], cost=0.0, kind="release")])
    (freed,) = await store.reserve([hold(amount=0.01, max_inflight=2)], NOW + 2)
    assert freed.refused is None
    (other,) = await store.reserve([hold(email="v@example.com", amount=0.01, max_inflight=2)], NOW + 2)
    assert other.refused is None  # the cap is per user


@pytest.mark.gen_test
async def test_rpm_limit_with_retry_after_and_released_holds_still_count(store):
    admitted = []
    for i in range(3):
        (a,) = await store.reserve([hold(amount=0.001, rpm=3)], NOW + i)
        assert a.refused is None
        admitted.append(a)
    await store.settle([charge(a, cost=0.001) for a in admitted])  # finished requests still count for rpm
    (r,) = await store.reserve([hold(amount=0.001, rpm=3)], NOW + 10)
    assert r.refused == "rate" and r.retry_after == 50  # the oldest leaves the window at NOW + 60
    (r2,) = await store.reserve([hold(amount=0.001, rpm=3)], NOW + 59.5)
    assert r2.refused == "rate" and r2.retry_after == 1
    (ok,) = await store.reserve([hold(amount=0.001, rpm=3)], NOW + RATE_WINDOW + 0.5)
    assert ok.refused is None
    (ok2,) = await store.reserve([hold(email="v@example.com", amount=0.001, rpm=3)], NOW + 10)
    assert ok2.refused is None  # per user


@pytest.mark.gen_test
async def test_rpm_within_one_batch(store):
    got = await store.reserve([hold(amount=0.001, rpm=2) for _ in range(3)], NOW)
    assert [a.refused for a in got] == [None, None, "rate"]
    assert got[2].retry_after == 60


# --- holds expire ------------------------------------------------------------------------------

@pytest.mark.gen_test
async def test_holds_expire(store):
    (a,) = await store.reserve([hold(amount=0.9, hold_seconds=10, max_inflight=1)], NOW)
    assert await store.open_holds("u@example.com", NOW + 5) == pytest.approx(0.9)
    (b,) = await store.reserve([hold(amount=0.2, max_inflight=1)], NOW + 5)
    assert b.refused == "concurrency"
    assert await store.open_holds("u@example.com", NOW + 11) == 0
    (c,) = await store.reserve([hold(amount=0.2, max_inflight=1)], NOW + 11)
    assert c.refused is None and c.held == 0  # neither its money nor its slot counts any more
    # settling a request whose hold expired still bills it
    await store.settle([charge(a, cost=0.3)])
    assert await store.spend("u@example.com", D0) == pytest.approx(0.3)


# --- settle --------------------------------------------------------------------------------------

@pytest.mark.gen_test
async def test_settle_writes_ledger_totals_and_releases_holds(store):
    a, b, c = await store.reserve([hold(amount=0.1), hold(amount=0.2), hold(amount=0.3)], NOW)
    await store.settle([
        charge(a, cost=0.01, provider="openai", model="gpt-4o-mini", input_tokens=12, output_tokens=7, status=200,
               duration_ms=12.5, streamed=True, aborted=True, ts=NOW + 1),
        charge(b, cost=0.02, provider="openrouter", model="x/y", input_tokens=3, output_tokens=4, status=200, ts=NOW + 2),
        charge(c, cost=0.0, kind="release", status=500, ts=NOW + 3),
    ])
    assert await store.open_holds("u@example.com", NOW) == 0
    assert await store.spend("u@example.com", D0) == pytest.approx(0.03)
    assert await store.daily_usage("u@example.com", D0) == [(D0.isoformat(), pytest.approx(0.03))]
    rows = await store.ledger()
    assert len(rows) == 2  # a release writes no ledger row
    newest, oldest = rows
    assert oldest["id"] < newest["id"]
    assert {k: oldest[k] for k in ("ts", "email", "date", "kind", "provider", "model", "input_tokens",
                                   "output_tokens", "status", "duration_ms", "streamed", "aborted")} == {
        "ts": NOW + 1, "email": "u@example.com", "date": D0.isoformat(), "kind": "request", "provider": "openai",
        "model": "gpt-4o-mini", "input_tokens": 12, "output_tokens": 7, "status": 200, "duration_ms": 12.5,
        "streamed": True, "aborted": True}
    assert oldest["cost"] == pytest.approx(0.01) and isinstance(oldest["cost"], float)
    assert newest["streamed"] is False and newest["aborted"] is False and newest["model"] == "x/y"


@pytest.mark.gen_test
async def test_settle_many_charges_for_one_day_in_one_batch(store):
    got = await store.reserve([hold(amount=0.001) for _ in range(50)], NOW)
    await store.settle([charge(a, cost=0.001 * (i + 1)) for i, a in enumerate(got)]
                       + [charge(email="v@example.com", cost=0.5, day=D0 + timedelta(days=1))])
    assert await store.spend("u@example.com", D0) == pytest.approx(0.001 * 50 * 51 / 2)
    assert await store.open_holds("u@example.com", NOW) == 0
    assert len(await store.ledger(limit=1000)) == 51
    assert await store.ledger(email="v@example.com") == [pytest.approx(r) for r in await store.ledger(email="v@example.com")]
    assert [r["email"] for r in await store.ledger(email="v@example.com")] == ["v@example.com"]


@pytest.mark.gen_test
async def test_settle_is_atomic(store):
    (a,) = await store.reserve([hold(amount=0.5)], NOW)
    bad = Charge(email="u@example.com", day=D0, cost=0.2, provider=None, ts=NOW)  # provider is NOT NULL
    with pytest.raises(Exception):
        await store.settle([charge(a, cost=0.1, ts=NOW), bad])
    assert await store.ledger() == []
    assert await store.spend("u@example.com", D0) == 0
    assert await store.open_holds("u@example.com", NOW) == pytest.approx(0.5)  # not released either
    await store.settle([charge(a, cost=0.1, ts=NOW)])
    assert await store.spend("u@example.com", D0) == pytest.approx(0.1)
    assert await store.open_holds("u@example.com", NOW) == 0


# --- totals, ledger and adjustments ------------------------------------------------------------

@pytest.mark.gen_test
async def test_daily_totals_equal_ledger_sums_after_adjustments(store):
    emails = ["a@example.com", "b@example.com"]
    for i in range(30):
        await store.settle([charge(email=emails[i % 2], day=D0 + timedelta(days=i % 3), cost=0.0007 * (i + 1),
                                   model=f"m{i % 4}", ts=NOW + i)])
    await store.set_cost("a@example.com", D0, 0.123, NOW + 100)  # down
    await store.set_cost("b@example.com", D0 + timedelta(days=1), 5.0, NOW + 101)  # up
    await store.set_cost("c@example.com", D0, 0.25, NOW + 102)  # a day with no row yet
    await store.set_cost("c@example.com", D0, 0.0, NOW + 103)  # and back to zero
    await store.settle([charge(email="a@example.com", cost=0.01, ts=NOW + 104)])  # after an adjustment
    ledger_sums = defaultdict(float)
    rows = await store.ledger(limit=10_000)
    for r in rows:
        ledger_sums[(r["email"], r["date"])] += r["cost"]
    totals = {(u["email"], u["date"]): u["cost"] for u in await store.all_usage(limit=10_000)}
    assert set(totals) == set(ledger_sums)
    for key, total in totals.items():
        assert total == pytest.approx(ledger_sums[key], abs=1e-12), key
    assert totals[("a@example.com", D0.isoformat())] == pytest.approx(0.133)
    assert totals[("b@example.com", (D0 + timedelta(days=1)).isoformat())] == pytest.approx(5.0)
    assert totals[("c@example.com", D0.isoformat())] == 0
    adjust = [r for r in rows if r["kind"] == "adjust"]
    assert len(adjust) == 4
    assert [r["cost"] for r in adjust if r["email"] == "c@example.com"] == pytest.approx([-0.25, 0.25])
    # adjustments change spend but not the per-model breakdown
    assert await store.spend("b@example.com", D0) == pytest.approx(sum(
        c for (e, _), c in ledger_sums.items() if e == "b@example.com"))
    by_model = await store.usage_by_model("b@example.com", D0)
    assert sum(m["requests"] for m in by_model) == 15


@pytest.mark.gen_test
async def test_set_cost_racing_settlements_keeps_totals_equal_to_ledger(store, more_stores):
    (other,) = await more_stores(1)

    async def settle_many(s):
        for i in range(20):
            await s.settle([charge(cost=0.001, ts=NOW + i)])

    async def adjust_many(s):
        for i in range(10):
            await s.set_cost("u@example.com", D0, 0.5, NOW + i)
            await asyncio.sleep(0)
    await asyncio.gather(settle_many(store), adjust_many(other), settle_many(other))
    total = sum(r["cost"] for r in await store.ledger(limit=10_000))
    assert await store.spend("u@example.com", D0) == pytest.approx(total, abs=1e-12)


@pytest.mark.gen_test
async def test_daily_usage_and_ledger_order_and_filters(store):
    await store.settle([charge(cost=0.2, day=D0 + timedelta(days=2), ts=1), charge(cost=0.1, day=D0, ts=2),
                        charge(email="v@example.com", cost=0.3, ts=3)])
    assert await store.daily_usage("u@example.com", D0) == [
        (D0.isoformat(), pytest.approx(0.1)), ((D0 + timedelta(days=2)).isoformat(), pytest.approx(0.2))]
    assert await store.daily_usage("u@example.com", D0 + timedelta(days=1)) == [
        ((D0 + timedelta(days=2)).isoformat(), pytest.approx(0.2))]
    assert await store.daily_usage("nobody@example.com", D0) == []
    assert [r["ts"] for r in await store.ledger()] == [3, 2, 1]
    assert [r["ts"] for r in await store.ledger(email="u@example.com")] == [2, 1]
    assert [r["ts"] for r in await store.ledger(limit=1)] == [3]


@pytest.mark.gen_test
async def test_all_usage_filters_paging_and_order(store):
    emails = ["c@example.com", "a@example.com", "b@example.com"]
    await store.settle([charge(email=e, day=D0 + timedelta(days=d), cost=0.01 * (d + 1))
                        for d in range(5) for e in emails])
    everything = await store.all_usage()
    assert len(everything) == 15
    keys = [(u["date"], u["email"]) for u in everything]
    assert keys == sorted(keys, key=lambda k: (-date.fromisoformat(k[0]).toordinal(), k[1]))  # newest first, then email
    assert everything[0] == {"email": "a@example.com", "date": (D0 + timedelta(days=4)).isoformat(),
                             "cost": pytest.approx(0.05)}
    only_b = await store.all_usage(email="b@example.com")
    assert {u["email"] for u in only_b} == {"b@example.com"} and len(only_b) == 5
    window = await store.all_usage(since=D0 + timedelta(days=1), until=D0 + timedelta(days=2))
    assert {u["date"] for u in window} == {(D0 + timedelta(days=1)).isoformat(), (D0 + timedelta(days=2)).isoformat()}
    assert len(window) == 6
    as_text = await store.all_usage(email="a@example.com", since=(D0 + timedelta(days=3)).isoformat(),
                                    until=(D0 + timedelta(days=3)).isoformat())
    assert as_text == [{"email": "a@example.com", "date": (D0 + timedelta(days=3)).isoformat(), "cost": pytest.approx(0.04)}]
    pages = [await store.all_usage(limit=4, offset=o) for o in range(0, 16, 4)]
    assert [len(p) for p in pages] == [4, 4, 4, 3]
    assert [u for p in pages for u in p] == everything
    assert await store.all_usage(offset=100) == []
    assert await store.all_usage(email="nobody@example.com") == []


@pytest.mark.gen_test
async def test_usage_by_model(store):
    await store.settle([
        charge(cost=0.01, provider="openai", model="gpt-4o-mini", input_tokens=10, output_tokens=5),
        charge(cost=0.02, provider="openai", model="gpt-4o-mini", input_tokens=20, output_tokens=6),
        charge(cost=0.50, provider="openrouter", model="anthropic/claude-sonnet-4", input_tokens=100, output_tokens=50),
        charge(cost=0.40, provider="openai", model="gpt-4o-mini", day=D0 - timedelta(days=1), input_tokens=1),
        charge(email="v@example.com", cost=9.0, provider="openai", model="gpt-4o"),
    ])
    await store.set_cost("u@example.com", D0, 10.0, NOW)  # an admin's correction is a row of its own, no request
    assert await store.usage_by_model("u@example.com", D0) == [
        {"provider": "admin", "model": "adjustment", "requests": 0, "input_tokens": 0, "output_tokens": 0,
         "cost": pytest.approx(9.47, abs=1e-9)},
        {"provider": "openrouter", "model": "anthropic/claude-sonnet-4", "requests": 1, "input_tokens": 100,
         "output_tokens": 50, "cost": pytest.approx(0.5)},
        {"provider": "openai", "model": "gpt-4o-mini", "requests": 2, "input_tokens": 30, "output_tokens": 11,
         "cost": pytest.approx(0.03)},
    ]
    by_model = await store.usage_by_model("u@example.com", D0)  # the rows add up to the spend
    assert sum(m["cost"] for m in by_model) == pytest.approx(await store.spend("u@example.com", D0), abs=1e-9)
    older = await store.usage_by_model("u@example.com", D0 - timedelta(days=1))
    mini = next(m for m in older if m["model"] == "gpt-4o-mini")
    assert mini["requests"] == 3 and mini["cost"] == pytest.approx(0.43)
    assert await store.usage_by_model("nobody@example.com", D0) == []


# --- prune -----------------------------------------------------------------------------------------

@pytest.mark.gen_test
async def test_prune_drops_old_released_and_expired_holds_only(store):
    old = NOW - 1000
    released, expired, long_open = await store.reserve(
        [hold(amount=0.01), hold(amount=0.01, hold_seconds=10), hold(amount=0.02, hold_seconds=5000)], old)
    await store.settle([charge(released, cost=0.01)])
    recent_released, recent_open = await store.reserve([hold(amount=0.01), hold(amount=0.03)], NOW - 5)
    await store.settle([charge(recent_released, cost=0.01)])
    assert len(await sql(store, "SELECT id FROM holds")) == 5
    await store.prune(NOW)
    assert len(await sql(store, "SELECT id FROM holds")) == 3  # the long open hold and the two recent ones
    assert await store.open_holds("u@example.com", NOW) == pytest.approx(0.05)
    (r,) = await store.reserve([hold(amount=0.01, rpm=2)], NOW)  # recent (released) holds still count for rpm
    assert r.refused == "rate"
    await store.prune(NOW)  # idempotent
    assert len(await sql(store, "SELECT id FROM holds")) == 3


# --- schema and migrations ------------------------------------------------------------------------

def migrations_of(store) -> tuple:
    """The backend's own list of schema migrations."""
    return importlib.import_module(type(store).__module__).MIGRATIONS


@pytest.mark.gen_test
async def test_migrations_are_idempotent(store, more_stores):
    await store.settle([charge(cost=0.42)])
    again = await more_stores(2)  # setup() runs again on an existing, current schema
    for s in again:
        assert await s.spend("u@example.com", D0) == pytest.approx(0.42)
    assert await sql(store, "SELECT version FROM schema_version ORDER BY version") == [
        (v,) for v in range(1, len(migrations_of(store)) + 1)]


@pytest.mark.gen_test
async def test_concurrent_setup_from_several_stores(store_kind, store_url):
    stores = await asyncio.gather(*(open_store(store_url) for _ in range(4)))  # all race to migrate
    try:
        assert len(await sql(stores[0], "SELECT version FROM schema_version")) == len(migrations_of(stores[0]))
        await stores[1].settle([charge(cost=0.1)])
        assert await stores[3].spend("u@example.com", D0) == pytest.approx(0.1)
    finally:
        for s in stores:
            await s.close()


# --- several writers --------------------------------------------------------------------------------

@pytest.mark.gen_test
async def test_reservations_from_several_stores_never_overbook(store, more_stores):
    others = await more_stores(3)
    stores = [store, *others]
    now = time.time()

    async def one(s, i):
        (a,) = await s.reserve([hold(amount=0.25, limit=1.0)], now + i * 1e-6)
        return a
    got = await asyncio.gather(*(one(stores[i % 4], i) for i in range(40)))
    assert sum(a.refused is None for a in got) == 4  # held 0, .25, .5, .75 -> admitted; then 1.0 >= limit
    assert await store.open_holds("u@example.com", now + 1) == pytest.approx(1.0)


@pytest.mark.gen_test
async def test_concurrency_cap_across_stores(store, more_stores):
    others = await more_stores(1)
    got = await asyncio.gather(*(s.reserve([hold(amount=0.001, max_inflight=3)], NOW)
                                 for s in [store, *others] * 10))
    assert sum(a.refused is None for (a,) in got) == 3
    assert {a.refused for (a,) in got} == {None, "concurrency"}


@pytest.mark.gen_test
async def test_closed_store_raises_store_unavailable(store_kind, store_url):
    s = await open_store(store_url)
    await s.close()
    with pytest.raises(StoreUnavailable):
        await s.reserve([hold()], NOW)
    with pytest.raises(StoreUnavailable):
        await s.settle([charge()])
    with pytest.raises(StoreUnavailable):
        await s.spend("u@example.com", D0)
    await s.close()  # closing twice is harmless


# --- charge ids: a batch written again is billed once ------------------------------------------------

@pytest.mark.gen_test
async def test_settling_the_same_batch_twice_writes_each_charge_once(store):
    a, b = await store.reserve([hold(amount=0.1), hold(amount=0.1)], NOW)
    batch = [charge(a, cost=0.125, charge_id="p-1", ts=NOW), charge(b, cost=0.25, charge_id="p-2", ts=NOW),
             charge(email="v@example.com", cost=0.5, charge_id="p-3", ts=NOW)]
    await store.settle(batch)
    await store.settle(batch)  # as a retry does after the answer to the first commit was lost
    await store.settle([batch[1], charge(cost=0.0625, charge_id="p-4", ts=NOW), batch[1]])  # one new, one twice
    assert sorted(r["charge_id"] for r in await store.ledger(limit=100)) == ["p-1", "p-2", "p-3", "p-4"]
    assert await store.spend("u@example.com", D0) == pytest.approx(0.4375, abs=1e-9)
    assert await store.spend("v@example.com", D0) == pytest.approx(0.5, abs=1e-9)
    assert await store.open_holds("u@example.com", NOW) == 0


@pytest.mark.gen_test
async def test_charges_without_an_id_are_each_written(store):
    await store.settle([charge(cost=0.1), charge(cost=0.1)])
    await store.settle([charge(cost=0.1)])
    assert len(await store.ledger()) == 3
    assert await store.spend("u@example.com", D0) == pytest.approx(0.3, abs=1e-9)


@pytest.mark.gen_test
async def test_a_database_from_before_charge_ids_is_migrated_and_keeps_its_rows(store_kind, store_url):
    s = await open_store(store_url)
    await s.settle([charge(cost=0.2, ts=NOW)])
    # back to the schema before charge ids, as an older version left it (without the tables of later migrations)
    charge_ids = next(n for n, m in enumerate(migrations_of(s), start=1) if "ADD COLUMN charge_id" in m)
    if store_kind == "sqlite":
        await s._db.execute("DROP INDEX ledger_charge_id")
    await sql_write(s, "ALTER TABLE ledger DROP COLUMN charge_id")
    for table in ("budget_rules", "rules_version", "audit"):
        await sql_write(s, f"DROP TABLE {table}")
    await sql_write(s, f"DELETE FROM schema_version WHERE version >= {charge_ids}")
    await s.close()
    s = await open_store(store_url)
    try:
        await s.settle([charge(cost=0.3, charge_id="new-1", ts=NOW)])
        await s.settle([charge(cost=0.3, charge_id="new-1", ts=NOW)])
        assert sorted((r["cost"], r["charge_id"]) for r in await s.ledger()) == [(0.2, None), (0.3, "new-1")]
        assert await s.spend("u@example.com", D0) == pytest.approx(0.5, abs=1e-9)
    finally:
        await s.close()


async def sql_write(store, query: str) -> None:
    """Run one parameterless statement on either backend."""
    if store.url.startswith("sqlite"):
        await store._db.execute(query)
        return
    async with store._pool.acquire() as conn:
        await conn.execute(query)


# --- what goes into a row --------------------------------------------------------------------------

@pytest.mark.gen_test
async def test_text_and_numbers_are_cleaned_so_one_odd_charge_is_still_written(store):
    await store.settle([charge(cost=0.25, provider="open\x00router", model="openai/gpt-4o-mini:\x00x\n\ud800",
                               input_tokens=2**80, output_tokens=-3, status=2**40, duration_ms=float("nan"),
                               email="u@example.com", ts=NOW)])
    (row,) = await store.ledger()
    assert (row["provider"], row["model"]) == ("openrouter", "openai/gpt-4o-mini:x")
    assert (row["input_tokens"], row["output_tokens"], row["status"], row["duration_ms"]) == (2**62, 0, 2**31 - 1, 0)
    await store.settle([charge(cost=0.1, model="m" * 10_000, email="u@example.com", ts=NOW)])
    assert max(len(r["model"]) for r in await store.ledger()) == 256


@pytest.mark.gen_test
async def test_a_cost_that_is_not_a_finite_positive_number_is_written_as_zero(store):
    await store.settle([charge(cost=0.5, ts=NOW)] + [charge(cost=c, ts=NOW) for c in
                                                     (-0.25, float("nan"), float("inf"), float("-inf"))])
    assert await store.spend("u@example.com", D0) == pytest.approx(0.5, abs=1e-9)
    assert sorted(r["cost"] for r in await store.ledger()) == [0, 0, 0, 0, 0.5]


@pytest.mark.gen_test
async def test_a_row_the_store_refuses_raises_row_refused_not_store_unavailable(store):
    bad = Charge(email="u@example.com", day=D0, cost=0.2, provider=None, ts=NOW)  # provider is NOT NULL
    with pytest.raises(RowRefused):
        await store.settle([charge(cost=0.1, ts=NOW), bad])
    with pytest.raises(RowRefused):
        await store.settle([Charge(email="u@example.com", day=None, cost=0.2, ts=NOW)])
    assert await store.ledger() == []
