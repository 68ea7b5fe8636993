"""Billing integrity of the ledger writer: each charge written once, a bad row never holds up the others,
a failed writer restarts, a flush skips the linger, and the spool belongs to its store."""
from __future__ import annotations

import asyncio
import glob
import json
import logging
import math
import os
import shutil
import time
from datetime import date

import pytest

from aipipe.admission import MemoryAdmission, StoreAdmission
from aipipe.ledger import Ledger
from aipipe.spool import spool_dir
from aipipe.storage import Charge, open_store

from .test_ledger import FlakyStore

DAY = date(2026, 1, 2)
USER = "integrity@example.com"


def charge(cost: float, email: str = USER, **kw) -> Charge:
    return Charge(**{"email": email, "day": DAY, "cost": cost, "provider": "openai", "model": "gpt-4o-mini",
                     "ts": time.time(), **kw})


async def ledger_rows(store, email: str = USER) -> list[dict]:
    return [r for r in await store.ledger(email, limit=10_000) if r["kind"] != "adjust"]


async def until(condition, tries: int = 500) -> None:
    """Wait (bounded) until condition() is true."""
    for _ in range(tries):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not met in time")


def spool_files(folder: str) -> list[str]:
    return sorted(glob.glob(os.path.join(folder, "unsettled-*.jsonl")))


@pytest.fixture
def store(io_loop, store_kind, store_url):
    s = io_loop.run_sync(lambda: open_store(store_url))
    yield s
    io_loop.run_sync(s.close)


class FailsOnce:
    """Wraps a store; its next settle raises an error no store raises (a bug, say)."""

    def __init__(self, store, times: int = 1):
        self.store, self.times = store, times

    def __getattr__(self, name):
        return getattr(self.store, name)

    async def settle(self, charges):
        if self.times:
            self.times -= 1
            raise KeyError("unexpected")
        return await self.store.settle(charges)


# --- a refused row is set aside; the rest are written --------------------------------------------------

@pytest.mark.gen_test
async def test_a_nul_in_a_model_name_is_stripped_and_the_charge_is_written(store):
    ledger = Ledger(store)
    ledger.start()
    try:
        ledger.settle(Charge(USER, DAY, 0.25, None, "request", "openrouter\n", "openai/gpt-4o-mini:\x00x", 10, 5,
                             200, 1.0, False, False, time.time()))
        ledger.settle(charge(0.5, model="m" * 5000))
        await ledger.flush()
        rows = await ledger_rows(store)
        assert sorted(r["model"] for r in rows) == ["m" * 256, "openai/gpt-4o-mini:x"]
        assert {r["provider"] for r in rows} == {"openrouter", "openai"}
        assert await store.spend(USER, DAY) == pytest.approx(0.75, abs=1e-9)
    finally:
        await ledger.close()


@pytest.mark.gen_test
async def test_a_refused_charge_is_set_aside_and_the_others_are_written(store, tmp_path, caplog):
    folder = str(tmp_path / "spool")
    ledger = Ledger(store, spool_dir=folder)
    ledger.start()
    try:
        good = [charge(0.01 * (i + 1), email=f"u{i}@example.com") for i in range(6)]
        bad = charge(0.3, model="sk-secret-looking-model")
        bad.provider = None  # NOT NULL in both stores: refused whatever is cleaned
        for c in good[:3] + [bad] + good[3:]:
            ledger.settle(c)
        with caplog.at_level(logging.ERROR, logger="aipipe.ledger"):
            await ledger.flush()
        for i, c in enumerate(good):
            assert await store.spend(c.email, DAY) == pytest.approx(0.01 * (i + 1), abs=1e-9)
        assert await store.spend(USER, DAY) == 0
        (line,) = open(os.path.join(folder, "rejected.jsonl")).read().splitlines()
        row = json.loads(line)
        assert row["charge_id"] == bad.charge_id and row["cost"] == 0.3 and row["error"]
        refused = [r for r in caplog.records if "refused by the store" in r.getMessage()]
        assert len(refused) == 1 and bad.charge_id in refused[0].getMessage()
        assert "sk-secret" not in refused[0].getMessage()
        assert spool_files(folder) == []  # the rejected file is not replayed as a spool
        ledger.settle(charge(0.125))  # billing goes on
        await ledger.flush()
        assert await store.spend(USER, DAY) == pytest.approx(0.125, abs=1e-9)
    finally:
        await ledger.close()


@pytest.mark.gen_test
async def test_a_store_that_is_down_keeps_every_charge_instead_of_setting_any_aside(store, tmp_path):
    flaky = FlakyStore(store)
    folder = str(tmp_path / "spool")
    ledger = Ledger(flaky, spool_dir=folder, retry_seconds=0.05)
    ledger.start()
    try:
        flaky.down = True
        done = ledger.settle(charge(0.2))
        await asyncio.sleep(0.2)  # a few failed attempts
        assert ledger.pending == 1 and not os.path.exists(os.path.join(folder, "rejected.jsonl"))
        flaky.down = False
        await asyncio.shield(done)
        assert await store.spend(USER, DAY) == pytest.approx(0.2, abs=1e-9)
    finally:
        await ledger.close()


@pytest.mark.gen_test
@pytest.mark.parametrize("memory", [False, True])
async def test_a_cost_that_is_not_a_finite_positive_number_never_lowers_spend(tmp_path, memory, caplog):
    store = await open_store(f"sqlite:///{tmp_path}/c.db")
    ledger = Ledger(store)
    admission = MemoryAdmission(store, ledger) if memory else StoreAdmission(store, ledger)
    ledger.start()
    try:
        with caplog.at_level(logging.ERROR):
            for cost in (0.5, -0.25, math.nan, math.inf, -math.inf):
                c = charge(cost)
                if admission.settled(c):
                    ledger.settle(c)
            await ledger.flush()
        assert await store.spend(USER, DAY) == pytest.approx(0.5, abs=1e-9)
        assert sorted(r["cost"] for r in await ledger_rows(store)) == [0, 0, 0, 0, 0.5]
        assert sum("recorded as 0" in r.getMessage() for r in caplog.records) == 4
        if memory:
            assert admission.books.users == {} or all(
                not math.isnan(c) and c >= 0 for b in admission.books.users.values() for c in b.days.values())
    finally:
        await ledger.close()
        await store.close()


# --- the writer task -----------------------------------------------------------------------------------

@pytest.mark.gen_test
async def test_a_writer_that_fails_is_logged_at_once_restarted_and_drops_nothing(tmp_path, caplog):
    real = await open_store(f"sqlite:///{tmp_path}/w.db")
    ledger = Ledger(FailsOnce(real), retry_seconds=0.05)
    ledger.start()
    try:
        with caplog.at_level(logging.ERROR, logger="aipipe.ledger"):
            done = ledger.settle(charge(0.3))
            await until(lambda: any("writer failed" in r.getMessage() for r in caplog.records))
            (record,) = [r for r in caplog.records if "writer failed" in r.getMessage()]
            assert record.levelno == logging.ERROR and record.exc_info and record.exc_info[0] is KeyError
            assert ledger.pending == 1  # still queued while the writer restarts
            await asyncio.shield(done)
        assert await real.spend(USER, DAY) == pytest.approx(0.3, abs=1e-9)
        ledger.settle(charge(0.1))
        await ledger.flush()
        assert await real.spend(USER, DAY) == pytest.approx(0.4, abs=1e-9)
    finally:
        await ledger.close()
        await real.close()


@pytest.mark.gen_test
async def test_charges_of_a_writer_that_keeps_failing_are_spooled_at_close(tmp_path):
    real = await open_store(f"sqlite:///{tmp_path}/w.db")
    folder = str(tmp_path / "spool")
    ledger = Ledger(FailsOnce(real, times=1000), spool_dir=folder, retry_seconds=0.05)
    ledger.start()
    ledger.settle(charge(0.3))
    await asyncio.sleep(0.2)
    await ledger.close(timeout=2)
    again = Ledger(real, spool_dir=folder)
    again.start()
    try:
        await again.flush()
        assert await real.spend(USER, DAY) == pytest.approx(0.3, abs=1e-9)
    finally:
        await again.close()
        await real.close()


# --- flush ---------------------------------------------------------------------------------------------

@pytest.mark.gen_test
async def test_a_flush_right_after_a_settle_does_not_wait_out_the_linger(tmp_path):
    store = await open_store(f"sqlite:///{tmp_path}/f.db")
    ledger = Ledger(store, linger=3600.0)  # a flush that waited it out would time out instead
    ledger.start()
    try:
        ledger.settle(charge(0.1))
        await ledger.flush()  # in the same loop turn as the settle
        assert ledger.pending == 0 and await store.spend(USER, DAY) == pytest.approx(0.1, abs=1e-9)
        ledger.settle(charge(0.2))
        for _ in range(3):
            await asyncio.sleep(0)  # the writer is lingering now
        await ledger.flush()
        assert ledger.pending == 0 and await store.spend(USER, DAY) == pytest.approx(0.3, abs=1e-9)
    finally:
        await ledger.close()
        await store.close()


# --- the spool -----------------------------------------------------------------------------------------

def test_spool_folder_belongs_to_its_store(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("STATE_DIRECTORY", raising=False)
    assert spool_dir("sqlite:///data/a.db") == str(tmp_path / "data" / "a.db.spool")
    assert spool_dir("sqlite:////srv/b.db") == "/srv/b.db.spool"
    assert spool_dir("sqlite:///:memory:") is None
    pg = spool_dir("postgresql://ai:pw1@db.example:5432/aipipe?schema=s1")
    assert os.path.dirname(pg) == str(tmp_path) and "pw1" not in pg and "aipipe-spool-" in pg
    assert spool_dir("postgresql://ai:other@DB.example/aipipe?schema=s1&connect_timeout=2") == pg
    assert spool_dir("postgres://ai@db.example:5432/aipipe?application_name=x&schema=s1") == pg
    assert spool_dir("postgresql://ai@db.example:5433/aipipe?schema=s1") != pg
    assert spool_dir("postgresql://ai:pw1@db.example:5432/aipipe?schema=s2") != pg
    assert spool_dir("postgresql://ai:pw1@db.example:5432/other?schema=s1") != pg
    monkeypatch.setenv("STATE_DIRECTORY", "/var/lib/aipipe:/var/lib/more")
    assert spool_dir("postgresql://ai@db.example/aipipe").startswith("/var/lib/aipipe/aipipe-spool-")


async def spool_while_down(store, folder: str, costs) -> list[Charge]:
    """Queue charges while the store is down and close: they land in a spool file of folder."""
    flaky = FlakyStore(store)
    flaky.down = True
    ledger = Ledger(flaky, spool_dir=folder, retry_seconds=0.05)
    ledger.start()
    made = [charge(c) for c in costs]
    for c in made:
        ledger.settle(c)
    await asyncio.sleep(0.1)
    await ledger.close(timeout=2)
    return made


@pytest.mark.gen_test
async def test_spooled_charges_are_replayed_once_into_the_same_store_and_the_file_goes(store, store_url, tmp_path):
    folder = spool_dir(store_url, state_dir=str(tmp_path))
    await spool_while_down(store, folder, [0.125, 0.5])
    (spooled,) = spool_files(folder)
    assert os.path.basename(spooled).startswith(f"unsettled-{os.getpid()}-")
    for _ in range(2):  # a second start finds nothing left to replay
        again = Ledger(store, spool_dir=folder)
        again.start()
        await again.flush()
        await again.close()
        assert spool_files(folder) == []
    assert await store.spend(USER, DAY) == pytest.approx(0.625, abs=1e-9)
    assert len(await ledger_rows(store)) == 2


@pytest.mark.gen_test
async def test_a_spool_is_not_replayed_by_a_server_on_another_store(tmp_path):
    first = await open_store(f"sqlite:///{tmp_path}/first.db")
    other = await open_store(f"sqlite:///{tmp_path}/other.db")
    try:
        await spool_while_down(first, spool_dir(first.url), [0.25])
        ledger = Ledger(other, spool_dir=spool_dir(other.url))
        ledger.start()
        await ledger.close()
        assert await other.spend(USER, DAY) == 0
        assert len(spool_files(spool_dir(first.url))) == 1  # still there for its own store
    finally:
        await first.close()
        await other.close()


@pytest.mark.gen_test
async def test_a_spool_file_is_deleted_only_after_its_charges_are_committed(store, tmp_path):
    folder = str(tmp_path / "spool")
    await spool_while_down(store, folder, [0.25])
    (spooled,) = spool_files(folder)
    flaky = FlakyStore(store)
    flaky.down = True
    replaying = Ledger(flaky, spool_dir=folder, retry_seconds=0.05)
    replaying.start()
    await asyncio.sleep(0.2)  # failed attempts: the file stays, and stays locked against other replays
    assert os.path.exists(spooled) and replaying.pending == 1
    other = Ledger(store, spool_dir=folder)
    other.start()  # another worker starting meanwhile leaves the locked file alone
    assert other.pending == 0
    await other.close()
    flaky.down = False
    await replaying.flush()
    assert not os.path.exists(spooled)
    await replaying.close()
    assert spool_files(folder) == []
    assert await store.spend(USER, DAY) == pytest.approx(0.25, abs=1e-9)


@pytest.mark.gen_test
async def test_a_replay_cut_short_by_shutdown_moves_to_the_new_file_and_bills_once(store, tmp_path):
    folder = str(tmp_path / "spool")
    await spool_while_down(store, folder, [0.25, 0.5])
    (first,) = spool_files(folder)
    await spool_while_down(store, folder, [1.0])  # replays the first file while the store is still down
    (second,) = spool_files(folder)
    assert second != first and len(open(second).read().splitlines()) == 3
    again = Ledger(store, spool_dir=folder)
    again.start()
    await again.flush()
    await again.close()
    assert spool_files(folder) == []
    assert await store.spend(USER, DAY) == pytest.approx(1.75, abs=1e-9)


@pytest.mark.gen_test
async def test_replaying_the_same_spool_file_twice_charges_once(store, tmp_path):
    folder = str(tmp_path / "spool")
    await spool_while_down(store, folder, [0.25, 0.5])
    (spooled,) = spool_files(folder)
    # as if a process had replayed the file and died after the commit, before deleting it
    shutil.copy(spooled, spooled.replace("unsettled-", "unsettled-copy-"))
    legacy = {**json.loads(open(spooled).readline()), "charge_id": "", "cost": 0.0625}  # an older version's line
    with open(os.path.join(folder, "unsettled-legacy.jsonl"), "w") as f:
        f.write(json.dumps(legacy) + "\n")
    shutil.copy(os.path.join(folder, "unsettled-legacy.jsonl"), os.path.join(folder, "unsettled-legacy2.jsonl"))
    ledger = Ledger(store, spool_dir=folder)
    ledger.start()
    await ledger.flush()
    await ledger.close()
    assert spool_files(folder) == []
    assert await store.spend(USER, DAY) == pytest.approx(0.8125, abs=1e-9)
    assert len(await ledger_rows(store)) == 3


@pytest.mark.gen_test
async def test_a_charge_settled_after_close_goes_to_the_spool_and_is_billed_at_the_next_start(store, store_url,
                                                                                              tmp_path):
    folder = spool_dir(store_url, state_dir=str(tmp_path))
    ledger = Ledger(store, spool_dir=folder)
    ledger.start()
    await ledger.close()
    assert await ledger.settle(charge(0.375))  # a call that ended during the shutdown's last moments
    assert len(spool_files(folder)) == 1
    again = Ledger(store, spool_dir=folder)
    again.start()
    await again.flush()
    await again.close()
    assert await store.spend(USER, DAY) == pytest.approx(0.375, abs=1e-9)
    assert spool_files(folder) == []
