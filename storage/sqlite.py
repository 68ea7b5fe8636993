"""SQLite backend on aiosqlite: one connection in WAL mode, explicit IMMEDIATE transactions.

IMMEDIATE takes the write lock up front, so several server processes sharing one file
serialise their reservations instead of racing between read and write. Each transaction runs
whole on aiosqlite's connection thread (one hand-off per batch instead of one per statement),
so the event loop never blocks and transactions of one store never interleave.
"""
from __future__ import annotations

import asyncio
import fcntl
import json
import secrets
import sqlite3
from datetime import date

import aiosqlite

from ..budget import RATE_WINDOW, UserState, add_hold, decide_batch
from .base import (ADJUSTMENTS, Decision, Charge, HoldRequest, RowRefused, Store, StoreUnavailable,  # noqa: F401
                   UsersQuery, audit_row, charge_row, model_row, usage_filter, user_row)
from .sqlite_rules import read_rules, remove_rule, set_rule, write_audit
from .sqlite_sql import ADD_COST, BY_MODEL, LEDGER_INSERT, MIGRATIONS, USER_ORDER, USERS

# What binding or constraints raise for a row whose data SQLite will not take (as opposed to a locked or lost file).
REFUSED = (sqlite3.IntegrityError, sqlite3.InterfaceError, sqlite3.ProgrammingError, sqlite3.DataError,
           OverflowError, UnicodeError)


def ledger_row(c: Charge) -> tuple:
    """A Charge as the LEDGER_INSERT parameters (booleans are stored as 1 and 0)."""
    row = charge_row(c)
    day = row[3]
    return row[:3] + (day.isoformat() if isinstance(day, date) else day,) + row[4:]


class SQLiteStore(Store):
    """Budgets, holds and the ledger in one SQLite file."""

    single_file = True

    def __init__(self, path: str):
        self.path = path
        self.url = f"sqlite:///{path}"
        self._db: aiosqlite.Connection | None = None
        self._lock = None  # open lock file while claimed
        self._turns = None  # shared by several servers: open file whose flock orders their transactions
        self._data_version: int | None = None

    async def setup(self) -> None:
        """Open the file (WAL, NORMAL sync) and apply pending migrations."""
        self._db = await aiosqlite.connect(self.path, isolation_level=None, timeout=30)
        await self._set_wal()
        await self._db.execute("PRAGMA synchronous=NORMAL")
        await self._db.execute("PRAGMA busy_timeout=30000")
        await self._write(_migrate)

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
        """Close the connection and give up any claim."""
        if self._db is not None:
            await self._db.close()
            self._db = None
        for f in (self._lock, self._turns):
            if f is not None:
                f.close()  # closing the file drops its flock
        self._lock = self._turns = None

    def claim(self, exclusive: bool) -> None:
        """Lock `<file>.lock`: exclusively for a server keeping budgets in memory, shared for the others."""
        if self.path == ":memory:" or self._lock is not None:
            return
        from . import StoreConfigError

        lock = open(self.path + ".lock", "a")
        try:
            fcntl.flock(lock, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            who = "another AI Pipe server" if exclusive else "an AI Pipe server that keeps budgets in memory"
            raise StoreConfigError(f"{self.path} is already used by {who}: to share one file, run every server "
                                   'on it with storage.admission = "store" (or use PostgreSQL)') from None
        self._lock = lock
        if not exclusive:
            self._turns = open(self.path + ".turns", "a")

    async def changed_elsewhere(self) -> bool:
        """Whether another connection (another process) committed since the last call: PRAGMA data_version."""
        rows = await self._conn().execute_fetchall("PRAGMA data_version")
        version = rows[0][0]
        changed = self._data_version is not None and version != self._data_version
        self._data_version = version
        return changed

    def _conn(self) -> aiosqlite.Connection:
        if self._db is None:
            raise StoreUnavailable("SQLite store is closed")
        return self._db

    async def _write(self, work, *args):
        """Run work(connection, *args) as one IMMEDIATE transaction on the connection's thread."""
        db = self._conn()
        try:
            # aiosqlite's own way of running a function on its thread (as its backup() and iterdump() do)
            if self._turns is None:
                return await db._execute(_in_transaction, db._conn, work, *args)
            return await db._execute(_taking_turns, self._turns, db._conn, work, *args)
        except REFUSED as e:
            raise RowRefused(f"SQLite: {type(e).__name__}: {e}") from e
        except (sqlite3.OperationalError, ValueError) as e:
            raise StoreUnavailable(f"SQLite: {e}") from e

    async def reserve(self, requests: list[HoldRequest], now: float) -> list[Decision]:
        """Admit and hold each request in order, in one IMMEDIATE transaction."""
        return await self._write(_reserve, requests, now)

    async def settle(self, charges: list[Charge]) -> None:
        """Ledger rows, daily totals and hold releases for a batch, in one transaction; known charge ids skipped."""
        billed = [ledger_row(c) for c in charges if c.kind != "release"]
        released = [(c.hold_id,) for c in charges if c.hold_id is not None]
        await self._write(_settle, billed, released)

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
            BY_MODEL, (*ADJUSTMENTS, email, since.isoformat()))
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
        await self._write(_set_cost, email, day, cost, now)

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
        await self._write(_prune, now)

    async def rules_version(self) -> int:
        """The budget rules' version: one row read."""
        rows = await self._conn().execute_fetchall("SELECT version FROM rules_version")
        return int(rows[0][0])

    async def budget_rules(self) -> tuple[int, list[dict]]:
        """The version and the rules, read in one transaction."""
        db = self._conn()
        try:
            return await db._execute(read_rules, db._conn)
        except (sqlite3.OperationalError, ValueError) as e:
            raise StoreUnavailable(f"SQLite: {e}") from e

    async def set_budget_rule(self, rule: dict, admin: str, now: float) -> int:
        """Insert or replace a rule, bump the version and audit it, in one IMMEDIATE transaction."""
        return await self._write(set_rule, rule, admin, now)

    async def remove_budget_rule(self, match: str, admin: str, now: float) -> dict | None:
        """Delete a rule, bump the version and audit it, in one IMMEDIATE transaction."""
        return await self._write(remove_rule, match, admin, now)

    async def add_audit(self, admin: str, action: str, target: str, detail: dict, now: float) -> None:
        """One audit row."""
        await self._write(write_audit, admin, action, target, detail, now)

    async def audit(self, limit: int = 100, offset: int = 0) -> list[dict]:
        """Audit rows, newest first."""
        rows = await self._conn().execute_fetchall(
            "SELECT id, ts, admin, action, target, detail FROM audit ORDER BY id DESC LIMIT ? OFFSET ?", (limit, offset))
        return [audit_row(*r) for r in rows]

    async def users_summary(self, windows: list[tuple[str, date, float]], today: date, query: UsersQuery) -> dict:
        """Everyone's spend, requests and last call in their window: filtered, sorted and paged in one query."""
        rules = json.dumps([[m, since.isoformat(), limit] for m, since, limit in windows])
        first = min([since for _, since, _ in windows] + [today]).isoformat()
        order = f"{USER_ORDER[query.sort]} {'DESC' if query.descending else 'ASC'}, email"
        args = (rules, first, today.isoformat(), query.search.lower())
        rows = await self._conn().execute_fetchall(f"{USERS} ORDER BY {order} LIMIT ?5 OFFSET ?6",
                                                   (*args, query.limit, query.offset))
        if not rows and query.offset:  # past the last page: still say how many there are
            rows = await self._conn().execute_fetchall(f"{USERS} LIMIT 1 OFFSET 0", args)
            return {"total": rows[0][5] if rows else 0, "data": []}
        return {"total": rows[0][5] if rows else 0, "data": [user_row(*r[:5]) for r in rows]}


def ledger_dict(row: dict) -> dict:
    """A ledger row with streamed/aborted as booleans, as every backend returns them."""
    row["streamed"], row["aborted"] = bool(row["streamed"]), bool(row["aborted"])
    return row


# --- transaction bodies: plain sqlite3, run on aiosqlite's connection thread ---------------------------

def _in_transaction(conn: sqlite3.Connection, work, *args):
    conn.execute("BEGIN IMMEDIATE")
    try:
        result = work(conn, *args)
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
    return result


def _taking_turns(turns, conn: sqlite3.Connection, work, *args):
    # Processes sharing the file queue on a kernel lock, which wakes the next one the moment it is free;
    # SQLite's own busy handler would poll, sleeping 1 to 100 ms between tries.
    fcntl.flock(turns, fcntl.LOCK_EX)
    try:
        return _in_transaction(conn, work, *args)
    finally:
        fcntl.flock(turns, fcntl.LOCK_UN)


def _migrate(conn: sqlite3.Connection) -> None:
    conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
    current = conn.execute("SELECT MAX(version) FROM schema_version").fetchone()[0] or 0
    for version, script in enumerate(MIGRATIONS[current:], start=current + 1):
        for statement in filter(str.strip, script.split(";")):
            conn.execute(statement)
        conn.execute("INSERT INTO schema_version (version) VALUES (?)", (version,))


def _reserve(conn: sqlite3.Connection, requests: list[HoldRequest], now: float) -> list[Decision]:
    emails = sorted({r.email for r in requests})
    marks = ",".join("?" * len(emails))
    since = min(r.since for r in requests).isoformat()
    states = {e: UserState(daily=[]) for e in emails}
    for email, day, cost in conn.execute(
            f"SELECT email, date, cost FROM usage WHERE email IN ({marks}) AND date >= ?", (*emails, since)):
        states[email].daily.append((day, cost))
    rate_since = now - RATE_WINDOW if any(r.rpm for r in requests) else now  # recent holds matter only for rpm
    for email, amount, created, is_open in conn.execute(
            f"""SELECT email, amount, created, released = 0 AND expires > ? FROM holds
                WHERE email IN ({marks}) AND (released = 0 OR created > ?) ORDER BY created""",
            (now, *emails, rate_since)):
        add_hold(states[email], amount, created, bool(is_open), now)
    admissions, rows = decide_batch(requests, states, now, lambda: secrets.randbits(62))
    if rows:
        conn.executemany("INSERT INTO holds (id, email, amount, created, expires) VALUES (?,?,?,?,?)", rows)
    return admissions


def _settle(conn: sqlite3.Connection, billed: list[tuple], released: list[tuple]) -> None:
    billed = _unwritten(conn, billed)
    if billed:
        conn.executemany(LEDGER_INSERT, billed)
    totals: dict[tuple[str, str], float] = {}  # one update per user and day, as PostgreSQL's SETTLE does
    for row in billed:
        if row[9]:  # cost
            key = row[2], row[3]  # email, date
            totals[key] = totals.get(key, 0.0) + row[9]
    if totals:
        conn.executemany(ADD_COST, [(*key, cost) for key, cost in totals.items()])
    if released:  # releasing a hold twice changes nothing
        conn.executemany("UPDATE holds SET released = 1 WHERE id = ?", released)


def _unwritten(conn: sqlite3.Connection, rows: list[tuple]) -> list[tuple]:
    """The rows whose charge id is neither in the ledger nor earlier in rows (rows without an id all count)."""
    ids = [r[0] for r in rows if r[0] is not None]
    if not ids:
        return rows
    seen = set()
    for i in range(0, len(ids), 500):  # within SQLite's limit on bound parameters
        chunk = ids[i:i + 500]
        seen.update(r[0] for r in conn.execute(
            f"SELECT charge_id FROM ledger WHERE charge_id IN ({','.join('?' * len(chunk))})", chunk))
    fresh = []
    for row in rows:
        if row[0] is None or row[0] not in seen:
            if row[0] is not None:
                seen.add(row[0])
            fresh.append(row)
    return fresh


def _set_cost(conn: sqlite3.Connection, email: str, day: date, cost: float, now: float) -> None:
    row = conn.execute("SELECT cost FROM usage WHERE email = ? AND date = ?", (email, day.isoformat())).fetchone()
    delta = cost - (row[0] if row else 0.0)
    conn.execute(LEDGER_INSERT, ledger_row(Charge(email=email, day=day, cost=delta, kind="adjust", ts=now)))
    conn.execute("""INSERT INTO usage (email, date, cost) VALUES (?, ?, ?)
                    ON CONFLICT (email, date) DO UPDATE SET cost = excluded.cost""", (email, day.isoformat(), cost))


def _prune(conn: sqlite3.Connection, now: float) -> None:
    conn.execute("DELETE FROM holds WHERE created < ? AND (released = 1 OR expires < ?)", (now - 2 * RATE_WINDOW, now))
