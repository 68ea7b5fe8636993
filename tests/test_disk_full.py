"""A full disk under the SQLite file: charges wait (none lost), new calls get 503, health says so, all land later."""
from __future__ import annotations

import asyncio

import orjson
import pytest

from .conftest import token
from .helpers import chat

MINI = 12 * 0.15e-6 + 7 * 0.6e-6  # one fake chat call on gpt-4o-mini, USD


async def page_count(store) -> int:
    async with store._db.execute("PRAGMA page_count") as cursor:
        return (await cursor.fetchone())[0]


@pytest.mark.gen_test(timeout=120)
async def test_charges_wait_out_a_full_disk_and_are_all_written_once_it_has_room(call, gateway, upstream):
    store = gateway.store
    # SQLite answers SQLITE_FULL ("database or disk is full") once the file may not grow: as a full disk does
    await store._db.execute(f"PRAGMA max_page_count = {await page_count(store)}")
    t = token("filler@example.com")
    ok = 0
    for _ in range(400):  # enough rows to need a new page; bounded
        r = await call("/openai/v1/chat/completions", "POST", json=chat(), token=t)
        if r.code == 200:
            ok += 1
            continue
        assert r.code == 503 and orjson.loads(r.body) == {"message": "Usage store unavailable, try again shortly"}
        break
    else:
        pytest.fail("the file never filled up")
    for _ in range(200):  # the writer keeps its charges and retries; health reports it meanwhile
        health = await call("/healthz")
        if health.code == 503:
            break
        gateway._health = (float("-inf"), None)
        await asyncio.sleep(0.05)
    assert orjson.loads(health.body) == {"status": "unavailable", "reason": "charges cannot be written to the store"}
    assert gateway.ledger.pending > 0

    await store._db.execute("PRAGMA max_page_count = 1073741823")  # room again
    await gateway.ledger.flush(timeout=30)
    rows = await store.ledger("filler@example.com", limit=10_000)
    assert len(rows) == ok  # every call that was answered is billed, once
    assert sum(r["cost"] for r in rows) == pytest.approx(ok * MINI, abs=1e-9)
    gateway._health = (float("-inf"), None)
    assert (await call("/healthz")).code == 200
    assert (await call("/openai/v1/chat/completions", "POST", json=chat(), token=t)).code == 200
    from prometheus_client.parser import text_string_to_metric_families

    errors = {s.name: s.value for f in text_string_to_metric_families((await call("/metrics")).body.decode())
              for s in f.samples}
    assert errors["aipipe_store_errors_total"] >= 1
