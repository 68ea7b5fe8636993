"""SQLite backend on aiosqlite: one connection in WAL mode, explicit IMMEDIATE transactions.

IMMEDIATE takes the write lock up front, so several server processes sharing one file
serialise their reservations instead of racing between read and write.
"""
from __future__ import annotations

import asyncio
import secrets
import sqlite3
from datetime import date

import aiosqlite

from .base import (RATE_WINDOW, Admission, Charge, HoldRequest, Store, StoreUnavailable, UserState, add_hold,  # noqa: F401
                   decide_batch, model_row, usage_filter)

MIGRATIONS = (
    """
    CREATE TABLE usage (email TEXT NOT NULL, date TEXT NOT NULL, cost REAL NOT NULL DEFAULT 0,
                        PRIMARY KEY (email, date));
    CREATE TABLE ledger (id INTEGER PRIMARY KEY AUTOINCREMENT, ts REAL NOT NULL, email TEXT NOT NULL,
        date TEXT NOT NULL, kind TEXT NOT NULL, provider TEXT NOT NULL DEFAULT '', model TEXT NOT NULL DEFAULT '',
        input_tokens INTEGER NOT NULL DEFAULT 0, output_tokens INTEGER NOT NULL DEFAULT 0,
        cost REAL NOT NULL, status INTEGER NOT NULL DEFAULT 0, duration_ms REAL NOT NULL DEFAULT 0,
        streamed INTEGER NOT NULL DEFAULT 0, aborted INTEGER NOT NULL DEFAULT 0);
    CREATE INDEX ledger_email_date ON ledger (email, date);
    CREATE TABLE holds (id INTEGER PRIMARY KEY, email TEXT NOT NULL, amount REAL NOT NULL,
        created REAL NOT NULL, expires REAL NOT NULL, released INTEGER NOT NULL DEFAULT 0);
    CREATE INDEX holds_email ON holds (email, created);
    """,
    # admissions sum the open holds of a user: keep that read small however many holds were ever placed
    "CREATE INDEX holds_open ON holds (email) WHERE released = 0",
)

LEDGER_INSERT = """INSERT INTO ledger (ts, email, date, kind, provider, model, input_tokens, output_tokens,
    cost, status, duration_ms, streamed, aborted) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)"""
ADD_COST = """INSERT INTO usage (email, date, cost) VALUES (?, ?, ?)
    ON CONFLICT (email, date) DO UPDATE SET cost = cost + excluded.cost"""


def ledger_row(c: Charge) -> tuple:
    """A Charge as the LEDGER_INSERT parameters."""
    return (c.ts, c.email, c.day.isoformat(), c.kind, c.provider, c.model, c.input_tokens,
            c.output_tokens, c.cost, c.status, c.duration_ms, int(c.streamed), int(c.aborted))


class SQLiteStore(Store):
    """Budgets, holds and the ledger in one SQLite file."""

    def __init__(self, path: str):
        self.path = path
        self.url = f"sqlite:///{path}"
        self._db: aiosqlite.Connection | None = None
        self._lock = asyncio.Lock()  # one transaction at a time on the one connection

    async def setup(self) -> None:
        """Open the file (WAL, NORMAL sync) and apply pending migrations."""
        self._db = await aiosqlite.connect(self.path, isolation_level=None, timeout=30)
        await self._set_wal()
        await self._db.execute("PRAGMA synchronous=NORMAL")
        await self._db.execute("PRAGMA busy_timeout=30000")
        async with self._transaction():
            await self._db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            rows = await self._db.execute_fetchall("SELECT MAX(version) FROM schema_version")
            current = rows[0][0] or 0
            for version, script in enumerate(MIGRATIONS[current:], start=current + 1):
                for statement in filter(str.strip, script.split(";")):
                    await self._db.execute(statement)
                await self._db.execute("INSERT INTO schema_version (version) VALUES (?)", (version,))

    async def _set_wal(self, tries: int = 300) -> None:
        # Switching a new file to WAL answers "database is locked" at once, without waiting on the busy
        # timeout, while another process does the same: retry for up to ~30 s.
        for attempt in range(tries):
            try:
                await self._db.execute("PRAGMA journal_mode=WAL")
                return
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) or attempt == tries - 1:
                    raise
                await asyncio.sleep(0.1)

    async def close(self) -> None:
        """Close the connection."""
        if self._db is not None:
            await self._db.close()
            self._db = None

    def _transaction(self):
        return _Transaction(self)

    def _conn(self) -> aiosqlite.Connection:
        if self._db is None:
            raise StoreUnavailable("SQLite store is closed")
        return self._db

    async def reserve(self, requests: list[HoldRequest], now: float) -> list[Admission]:
        """Admit and hold each request in order, in one IMMEDIATE transaction."""
        db = self._conn()
        emails = sorted({r.email for r in requests})
        marks = ",".join("?" * len(emails))
        since = min(r.since for r in requests).isoformat()
        async with self._transaction():
            daily = await db.execute_fetchall(
                f"SELECT email, date, cost FROM usage WHERE email IN ({marks}) AND date >= ?", (*emails, since))
            holds = await db.execute_fetchall(
                f"""SELECT email, amount, created, released = 0 AND expires > ? FROM holds
                    WHERE email IN ({marks}) AND (released = 0 OR created > ?) ORDER BY created""",
                (now, *emails, now - RATE_WINDOW))
            states = {e: UserState(daily=[]) for e in emails}
            for email, day, cost in daily:
                states[email].daily.append((day, cost))
            for email, amount, created, is_open in holds:
                add_hold(states[email], amount, created, bool(is_open), now)
            admissions, rows = decide_batch(requests, states, now, lambda: secrets.randbits(62))
            if rows:
                await db.executemany("INSERT INTO holds (id, email, amount, created, expires) VALUES (?,?,?,?,?)", rows)
        return admissions

    async def settle(self, charges: list[Charge]) -> None:
        """Ledger rows, daily totals and hold releases for a batch, in one transaction."""
        db = self._conn()
        billed = [c for c in charges if c.kind != "release"]
        async with self._transaction():
            if billed:
                await db.executemany(LEDGER_INSERT, [ledger_row(c) for c in billed])
                await db.executemany(ADD_COST, [(c.email, c.day.isoformat(), c.cost) for c in billed if c.cost])
            released = [(c.hold_id,) for c in charges if c.hold_id is not None]
            if released:
                await db.executemany("UPDATE holds SET released = 1 WHERE id = ?", released)

    async def spend(self, email: str, since: date) -> float:
        """Settled cost in the window."""
        rows = await self._conn().execute_fetchall(
            "SELECT COALESCE(SUM(cost), 0) FROM usage WHERE email = ? AND date >= ?", (email, since.isoformat()))
        return float(rows[0][0])

    async def open_holds(self, email: str, now: float) -> float:
        """USD held by requests in flight."""
        rows = await self._conn().execute_fetchall(
            "SELECT COALESCE(SUM(amount), 0) FROM holds WHERE email = ? AND released = 0 AND expires > ?", (email, now))
        return float(rows[0][0])

    async def daily_usage(self, email: str, since: date) -> list[tuple[str, float]]:
        """Days with spend, oldest first."""
        rows = await self._conn().execute_fetchall(
            "SELECT date, cost FROM usage WHERE email = ? AND date >= ? ORDER BY date", (email, since.isoformat()))
        return [(d, float(c)) for d, c in rows]

    async def usage_by_model(self, email: str, since: date) -> list[dict]:
        """Ledger sums per provider and model."""
        rows = await self._conn().execute_fetchall(
            """SELECT provider, model, COUNT(*), SUM(input_tokens), SUM(output_tokens), SUM(cost) FROM ledger
               WHERE email = ? AND date >= ? AND kind = 'request' GROUP BY provider, model ORDER BY SUM(cost) DESC""",
            (email, since.isoformat()))
        return [model_row(r) for r in rows]

    async def all_usage(self, email=None, since=None, until=None, limit=1000, offset=0) -> list[dict]:
        """Daily totals of everyone, newest first."""
        where, args = usage_filter(email, since, until)
        rows = await self._conn().execute_fetchall(
            f"SELECT email, date, cost FROM usage {where} ORDER BY date DESC, email LIMIT ? OFFSET ?",
            (*args, limit, offset))
        return [{"email": e, "date": d, "cost": float(c)} for e, d, c in rows]

    async def set_cost(self, email: str, day: date, cost: float, now: float) -> None:
        """Overwrite a day's total; the difference goes in the ledger as an adjustment."""
        db = self._conn()
        async with self._transaction():
            rows = await db.execute_fetchall("SELECT cost FROM usage WHERE email = ? AND date = ?", (email, day.isoformat()))
            delta = cost - (rows[0][0] if rows else 0.0)
            await db.execute(LEDGER_INSERT, ledger_row(Charge(email=email, day=day, cost=delta, kind="adjust", ts=now)))
            await db.execute(
                """INSERT INTO usage (email, date, cost) VALUES (?, ?, ?)
                   ON CONFLICT (email, date) DO UPDATE SET cost = excluded.cost""", (email, day.isoformat(), cost))

    async def ledger(self, email: str | None = None, limit: int = 100) -> list[dict]:
        """Newest ledger rows."""
        where, args = ("WHERE email = ?", (email,)) if email else ("", ())
        cur = await self._conn().execute(f"SELECT * FROM ledger {where} ORDER BY id DESC LIMIT ?", (*args, limit))
        names = [d[0] for d in cur.description]
        rows = await cur.fetchall()
        await cur.close()
        return [ledger_dict(dict(zip(names, r))) for r in rows]

    async def prune(self, now: float) -> None:
        """Forget holds that no longer count for anything."""
        async with self._transaction():
            await self._conn().execute(
                "DELETE FROM holds WHERE created < ? AND (released = 1 OR expires < ?)", (now - 2 * RATE_WINDOW, now))


def ledger_dict(row: dict) -> dict:
    """A ledger row with streamed/aborted as booleans, as every backend returns them."""
    row["streamed"], row["aborted"] = bool(row["streamed"]), bool(row["aborted"])
    return row


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on error; sqlite3 errors become StoreUnavailable.

    Transactions of one store take turns (the store's lock): coroutines share its one connection,
    and a second BEGIN on it would fail, or worse, run its statements inside the first transaction.
    """

    def __init__(self, store: SQLiteStore):
        self.store = store

    async def __aenter__(self):
        await self.store._lock.acquire()
        try:
            self.db = self.store._conn()
            await self.db.execute("BEGIN IMMEDIATE")
        except (sqlite3.OperationalError, ValueError) as e:
            self.store._lock.release()
            raise StoreUnavailable(f"SQLite: {e}") from e
        except BaseException:
            self.store._lock.release()
            raise

    async def __aexit__(self, exc_type, exc, tb):
        try:
            if exc_type is None:
                await self.db.execute("COMMIT")
            else:
                await self.db.execute("ROLLBACK")
                if isinstance(exc, sqlite3.OperationalError):
                    raise StoreUnavailable(f"SQLite: {exc}") from exc
        finally:
            self.store._lock.release()
        return False
