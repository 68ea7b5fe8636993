"""A lone server on an SQLite file admits from memory: same budget rules, no database round trip per request."""
from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import sqlite3
import time
from datetime import date, datetime, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tornado.httputil import HTTPHeaders

from aipipe.admission import MemoryAdmission
from aipipe.books import Books
from aipipe.budget import today_utc, utc_date
from aipipe.errors import ApiError
from aipipe.providers.base import Call
from aipipe.providers.openai import PROVIDER as OPENAI
from aipipe.relay import Outcome
from aipipe.ledger import LINGER, Ledger
from aipipe.storage import Charge, HoldRequest, StoreConfigError, StoreUnavailable, open_store

from .conftest import token
from .helpers import chat, message

TODAY = date(2026, 1, 10)


def request(amount=0.01, limit=1.0, email="m@example.com", **kw) -> HoldRequest:
    return HoldRequest(email=email, amount=amount, since=TODAY - timedelta(days=6), limit=limit, **kw)


def charge(cost: float, hold_id=None, email="m@example.com", day=TODAY, kind="request") -> Charge:
    return Charge(email=email, day=day, cost=cost, hold_id=hold_id, kind=kind, provider="openai", model="m", ts=time.time())


def test_books_apply_the_store_rules_to_the_cent():
    books, now = Books(), 1000.0
    books.load("m@example.com", TODAY - timedelta(days=6), [((TODAY - timedelta(days=7)).isoformat(), 5.0),
                                                            (TODAY.isoformat(), 0.97)], [])
    first = books.admit(request(amount=0.02), now)
    assert first.hold_id is not None and first.spent == pytest.approx(0.97) and first.held == 0
    too_big = books.admit(request(amount=0.02), now)  # 0.97 spent + 0.02 held + 0.02 of its own > 1.00
    assert too_big.refused == "budget" and too_big.spent + too_big.held == pytest.approx(0.99)
    second = books.admit(request(amount=0.005), now)  # 0.97 + 0.02 + 0.005 <= 1.00: still fits
    assert second.hold_id is not None and second.held == pytest.approx(0.02)
    refused = books.admit(request(amount=0.0051), now)  # 0.97 + 0.025 + 0.0051 > 1.00
    assert refused.refused == "budget" and refused.spent + refused.held == pytest.approx(0.995)
    books.settle(charge(0.0, hold_id=first.hold_id, kind="release"))
    books.settle(charge(0.015, hold_id=second.hold_id))
    assert books.held("m@example.com", now) == 0
    assert books.admit(request(), now).spent == pytest.approx(0.985)  # the day before the window never counted


def test_books_concurrency_rate_and_hold_expiry():
    books, now = Books(), 1000.0
    assert books.admit(request(), now) is None  # spend not read yet: the writer must read it first
    books.load("m@example.com", TODAY - timedelta(days=6), [], [])
    a = books.admit(request(max_inflight=1, hold_seconds=10), now)
    assert books.admit(request(max_inflight=1), now).refused == "concurrency"
    assert books.admit(request(max_inflight=1), now + 11).hold_id is not None  # the first hold expired
    assert books.held("m@example.com", now + 11) == pytest.approx(0.01)
    books.settle(charge(0.0, hold_id=a.hold_id, kind="release"))
    limited = [books.admit(request(rpm=3), now + 100) for _ in range(3)]
    assert all(x.hold_id for x in limited)
    refused = books.admit(request(rpm=3), now + 130)  # 3 admissions in the last minute already
    assert refused.refused == "rate" and refused.retry_after == 30
    assert books.admit(request(rpm=3), now + 161).hold_id is not None


def settle(admission, ledger, charge):
    """A call's end as the gateway handles it: the admission releases the hold, the ledger writes the charge."""
    return ledger.settle(charge) if admission.settled(charge) else None


@pytest.mark.gen_test
async def test_first_admission_counts_queued_charges_exactly_once(tmp_path):
    """A user's spend is read by the writer: charges written and charges still queued are each counted once."""
    store = await open_store(f"sqlite:///{tmp_path}/m.db")
    spool = tmp_path / "unsettled.jsonl"
    row = {**dataclasses.asdict(charge(0.40)), "day": TODAY.isoformat()}
    spool.write_text(json.dumps(row) + "\n")
    await store.settle([charge(0.35)])  # already in the file before the server starts
    ledger = Ledger(store, spool_path=str(spool), linger=LINGER)
    admission = MemoryAdmission(store, ledger)
    ledger.start()  # the spooled 0.40 is queued for writing
    try:
        decision = await asyncio.wait_for(admission.decide(request(limit=1.0)), 30)  # a hang guard
        assert decision.spent == pytest.approx(0.75)
        settle(admission, ledger, charge(0.25, hold_id=decision.hold_id))
        refused = admission.decide_now(request(limit=1.0))  # 1.00 of 1.00: out of budget, with no round trip
        assert refused.refused == "budget" and refused.spent == pytest.approx(1.0)
    finally:
        await ledger.close()
    assert await store.spend("m@example.com", TODAY) == pytest.approx(1.0)
    assert await store.open_holds("m@example.com", 0) == 0  # holds never touched the file
    await store.close()


@pytest.mark.gen_test
async def test_memory_mode_refuses_admissions_while_charges_cannot_be_written(tmp_path):
    from .test_ledger import FlakyStore

    store = FlakyStore(await open_store(f"sqlite:///{tmp_path}/m.db"))
    ledger = Ledger(store, retry_seconds=0.05, linger=LINGER)
    admission = MemoryAdmission(store, ledger, retry_seconds=0.05)
    ledger.start()
    try:
        decision = await admission.decide(request())
        store.down = True
        done = settle(admission, ledger, charge(0.1, hold_id=decision.hold_id))
        for _ in range(600):  # the writer's first attempt failed (a bounded wait: 30 s)
            if ledger.failing:
                break
            await asyncio.sleep(0.05)
        with pytest.raises(StoreUnavailable):
            await admission.decide(request())
        store.down = False
        await asyncio.wait_for(done, 30)  # a hang guard
        await asyncio.sleep(0.1)
        assert (await admission.decide(request())).spent == pytest.approx(0.1)
    finally:
        await ledger.close()
        await store.close()


@pytest.mark.gen_test
async def test_one_file_one_memory_server(tmp_path, make_gateway):
    url = f"sqlite:///{tmp_path}/shared.db"
    gw = await make_gateway(storage={"url": url})
    assert gw.books is not None
    with pytest.raises(StoreConfigError, match="already used by another AI Pipe server"):
        await make_gateway(storage={"url": url})
    with pytest.raises(StoreConfigError, match="keeps budgets in memory"):
        await make_gateway(storage={"url": url, "admission": "store"})


@pytest.mark.gen_test
async def test_store_mode_servers_share_a_file(tmp_path, make_gateway):
    url = f"sqlite:///{tmp_path}/shared.db"
    a = await make_gateway(storage={"url": url, "admission": "store"})
    b = await make_gateway(storage={"url": url, "admission": "store"})
    assert a.books is None and b.books is None
    with pytest.raises(StoreConfigError, match="already used"):
        await make_gateway(storage={"url": url})  # auto would keep budgets in memory: refused


@pytest.mark.gen_test
async def test_admin_correction_applies_to_the_next_request(make_gateway, serve, call, store_url):
    gw = await make_gateway()
    url = serve(gw)
    user = token("fix@example.com")
    assert (await call(url + "/openai/v1/chat/completions", "POST", json=chat(), token=user)).code == 200
    r = await call(url + "/admin/cost", "POST", token=token("admin@example.com"),
                   json={"email": "fix@example.com", "date": today_utc().isoformat(), "cost": 1.0})
    assert r.code == 200
    r = await call(url + "/openai/v1/chat/completions", "POST", json=chat(), token=user)
    assert r.code == 429 and message(r).startswith("Usage $1 / $1")


@pytest.mark.gen_test(timeout=60)
async def test_a_write_from_another_program_is_seen_within_seconds(tmp_path, make_gateway, serve, call):
    path = tmp_path / "outside.db"
    gw = await make_gateway(storage={"url": f"sqlite:///{path}"})
    url = serve(gw)
    user = token("cli@example.com")
    assert (await call(url + "/openai/v1/chat/completions", "POST", json=chat(), token=user)).code == 200
    with sqlite3.connect(path) as db:  # what `aipipe set-cost` does, from another process
        db.execute("INSERT INTO usage (email, date, cost) VALUES (?, ?, 5.0) ON CONFLICT (email, date) "
                   "DO UPDATE SET cost = 5.0", ("cli@example.com", today_utc().isoformat()))
    for _ in range(100):  # the store is checked every second; 100 tries of at least 0.2 s is a generous hang guard
        r = await call(url + "/openai/v1/chat/completions", "POST", json=chat(), token=user)
        if r.code == 429:
            break
        await asyncio.sleep(0.2)
    # requests admitted before the write was noticed were billed on top of the 5.00
    assert r.code == 429 and message(r).startswith("Usage $5.0") and message(r).endswith("/ $1 in 7 days")


def test_idle_users_are_forgotten_and_reread_holds_survive_a_reread():
    books, now = Books(), 1000.0
    books.load("m@example.com", TODAY - timedelta(days=6), [(TODAY.isoformat(), 0.5)], [])
    busy = books.admit(request(amount=0.2), now)
    books.forget_spend()  # another program wrote the file: spend is read again, the hold in flight still counts
    assert not books.ready(request())
    books.load("m@example.com", TODAY - timedelta(days=6), [(TODAY.isoformat(), 0.7)], [])
    again = books.admit(request(amount=0.2), now)
    assert again.spent == pytest.approx(0.7) and again.held == pytest.approx(0.2)
    books.prune(now + 1)
    assert "m@example.com" in books.users  # requests in flight: kept
    for a in (busy, again):
        books.settle(charge(0.0, hold_id=a.hold_id, kind="release"))
    books.prune(now + 1)
    assert "m@example.com" not in books.users and not books.ready(request())


@pytest.mark.gen_test
async def test_a_rolling_window_moves_on_at_midnight(make_gateway, monkeypatch):
    """Budgets and window starts are looked up once a day per user: yesterday's spend leaves a 1-day window
    the moment the UTC date changes, in the same server."""
    import aipipe.gateway
    gw = await make_gateway(budget={"*": {"limit": 0.05, "days": 1}})
    day = date(2026, 11, 30)
    monkeypatch.setattr(aipipe.gateway, "today_utc", lambda: day)
    await gw.set_cost("night@example.com", day, 0.05)  # the whole budget, spent today
    with pytest.raises(ApiError) as refused:
        await gw.admit("night@example.com", OPENAI, Call("POST", "/v1/chat/completions", "", HTTPHeaders(), b"", model="gpt-4o-mini", hold=0.001))
    assert refused.value.status_code == 429 and "Usage $0.05 / $0.05 in 1 days" in refused.value.message
    day = date(2026, 12, 1)  # midnight passes
    admission = await gw.admit("night@example.com", OPENAI, Call("POST", "/v1/chat/completions", "", HTTPHeaders(), b"", model="gpt-4o-mini", hold=0.001))
    assert admission.hold_id is not None and admission.spent == 0.0


@settings(deadline=None)  # a loaded CI machine can take longer than the default 200 ms per example
@given(st.floats(min_value=0, max_value=4102444800, allow_nan=False))  # 1970 to 2100
def test_utc_date_is_the_calendar_date_in_utc(ts):
    # whole seconds: fromtimestamp rounds to microseconds, which can carry the last instant of a day into the next
    assert utc_date(ts) == datetime.fromtimestamp(int(ts), timezone.utc).date()


@pytest.mark.gen_test
@pytest.mark.parametrize("cost", [math.nan, -0.5, math.inf])
async def test_a_bad_cost_never_reaches_the_books_in_memory(cost, make_gateway):
    """A price that is not a finite, non-negative number is recorded as 0 before the in-memory books see it, so it
    can neither lower a user's spend nor turn it into NaN (which no limit would refuse)."""
    gw = await make_gateway(budget={"*": {"limit": 1.0, "days": 1}})
    chat_call = Call("POST", "/v1/chat/completions", "", HTTPHeaders(), b"", model="gpt-4o-mini", hold=0.9,
                     billable=True)
    first = await gw.admit("nan@example.com", OPENAI, chat_call)  # reads the user's spend into the books
    gw.settle("nan@example.com", first, "openai", chat_call, Outcome(status=200, cost=0.5), 1.0)
    second = gw.admit_now("nan@example.com", OPENAI, dataclasses.replace(chat_call, hold=0.1))
    gw.settle("nan@example.com", second, "openai", chat_call, Outcome(status=200, cost=cost), 1.0)
    with pytest.raises(ApiError) as refused:  # 0.5 spent: a call that may cost 0.9 no longer fits
        gw.admit_now("nan@example.com", OPENAI, chat_call)
    assert refused.value.status_code == 429 and "Usage $0.5 / $1" in refused.value.message
