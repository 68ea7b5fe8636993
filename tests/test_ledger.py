"""The ledger writer never drops a charge: retries while the store is down, spools at shutdown, replays at start."""
from __future__ import annotations

import asyncio
import os
import time
from datetime import date

import pytest

from aipipe.admission import StoreAdmission
from aipipe.ledger import Ledger
from aipipe.storage import Charge, HoldRequest, StoreUnavailable, open_store


class FlakyStore:
    """Wraps a real store; while `down` is set every call fails like a lost database."""

    def __init__(self, store):
        self.store, self.down = store, False

    def __getattr__(self, name):
        attr = getattr(self.store, name)
        if not callable(attr):
            return attr

        async def call(*args, **kw):
            if self.down:
                raise StoreUnavailable("connection refused")
            return await attr(*args, **kw)
        return call


def charge(cost: float, email: str = "l@example.com") -> Charge:
    return Charge(email=email, day=date(2026, 1, 2), cost=cost, provider="openai", model="gpt-4o-mini", ts=time.time())


@pytest.mark.gen_test
async def test_charges_wait_out_an_outage_while_admissions_fail_fast(tmp_path):
    store = FlakyStore(await open_store(f"sqlite:///{tmp_path}/l.db"))
    ledger = Ledger(store, retry_seconds=0.05)
    ledger.start()
    try:
        store.down = True
        done = ledger.settle(charge(0.25))
        with pytest.raises(StoreUnavailable):
            await asyncio.wait_for(StoreAdmission(store, ledger).decide(
                HoldRequest("l@example.com", 0.01, date(2026, 1, 1), 1.0)), 30)  # a hang guard
        await asyncio.sleep(0.2)
        assert ledger.pending == 1 and not done.done()
        store.down = False
        await asyncio.wait_for(asyncio.shield(done), 30)  # a hang guard
        assert await store.spend("l@example.com", date(2026, 1, 1)) == pytest.approx(0.25)
    finally:
        await ledger.close()
        await store.close()


@pytest.mark.gen_test
async def test_unwritten_charges_are_spooled_at_shutdown_and_replayed(tmp_path):
    spool = str(tmp_path / "unsettled.jsonl")
    store = FlakyStore(await open_store(f"sqlite:///{tmp_path}/l.db"))
    ledger = Ledger(store, spool_path=spool, retry_seconds=0.05)
    ledger.start()
    store.down = True
    ledger.settle(charge(0.125))
    ledger.settle(charge(0.5, "m@example.com"))
    await asyncio.sleep(0.1)
    await ledger.close(timeout=30)  # a hang guard: with the store down the writer gives up at its first try
    assert open(spool).read().count("\n") == 2
    store.down = False
    again = Ledger(store, spool_path=spool)
    again.start()
    try:
        await again.flush(30)  # the replayed charges are committed (StoreUnavailable after 30 s: a hang guard)
        assert await store.spend("l@example.com", date(2026, 1, 1)) == pytest.approx(0.125)
        assert await store.spend("m@example.com", date(2026, 1, 1)) == pytest.approx(0.5)
        rows = await store.ledger()
        assert sorted(r["cost"] for r in rows) == [0.125, 0.5]
        assert "unsettled.jsonl" not in os.listdir(tmp_path)  # deleted once its charges are written
        assert not any(name.endswith(".replayed") for name in os.listdir(tmp_path))
    finally:
        await again.close()
        await store.close()


@pytest.mark.gen_test
async def test_charges_queued_between_two_writes_share_one_future_and_each_resolves_once_written(tmp_path):
    store = await open_store(f"sqlite:///{tmp_path}/l.db")
    ledger = Ledger(store)
    ledger.start()
    try:
        first = [ledger.settle(charge(0.01 * (i + 1))) for i in range(3)]
        assert first[0] is first[1] is first[2] and not first[0].done()  # one future per write, not per charge
        await asyncio.wait_for(asyncio.shield(first[0]), 30)  # shared: a timeout must not cancel it for the others
        later = ledger.settle(charge(0.5))
        assert later is not first[0] and not later.done()
        await ledger.flush()
        assert later.done() and ledger.pending == 0
        assert await store.spend("l@example.com", date(2026, 1, 1)) == pytest.approx(0.56)
        await ledger.flush()  # nothing queued: returns at once
    finally:
        await ledger.close()
        await store.close()
