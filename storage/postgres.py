"""PostgreSQL backend on asyncpg: a connection pool, one transaction per batch, advisory locks.

URL: postgresql://user:password@host:5432/dbname[?param=value&...]. AI Pipe reads three
parameters itself and hands every other one to asyncpg (sslmode, ... or any server setting,
e.g. application_name=aipipe):

- schema=NAME          keep AI Pipe's tables in schema NAME (created if missing; search_path=NAME)
- connect_timeout=S    seconds to wait for a new connection (default 5)
- command_timeout=S    seconds one statement may take (default 30); also the server's
                       idle_in_transaction_session_timeout, which ends a transaction whose
                       connection vanished mid-commit (it would hold its users' locks)

Several processes on several machines may share one database:

- Migrations run in one transaction under pg_advisory_xact_lock, so instances that start at
  the same moment apply each migration exactly once.
- A reserve batch takes pg_advisory_xact_lock on (namespace, hashtext(email)) for each of its
  emails in a fixed order, then reads spend and holds in a single statement (one snapshot taken
  after the locks are held) and inserts the new holds: admissions for one email are serialised
  across every instance.
- settle writes ledger rows, adds to the daily totals (rows locked in a fixed order) and releases
  holds in one statement; a charge id already in the ledger is skipped (ON CONFLICT DO NOTHING) and
  only the rows inserted reach the totals, so a batch retried after its commit's answer was lost is
  written once. set_cost locks the day's row before reading it.

Every batch costs a handful of round trips whatever its size (arrays through unnest), which is
what keeps the single writer in aipipe/ledger.py fast. Connection problems surface as
StoreUnavailable (the pool reconnects by itself once the database answers again); a row whose data
PostgreSQL refuses (classes 22 and 23) as RowRefused.
"""
from __future__ import annotations

import asyncio
import json
import logging
import secrets
from contextlib import asynccontextmanager
from datetime import date
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import asyncpg

from ..budget import RATE_WINDOW, UserState, add_hold, decide_batch
from .base import (ADJUSTMENTS, Decision, Charge, HoldRequest, RowRefused, Store, StoreUnavailable,  # noqa: F401
                   UsersQuery, audit_row, budget_detail, charge_row, model_row, rule_row, usage_filter, user_row)
from .postgres_sql import (BUMP_VERSION, BY_MODEL, INSERT_AUDIT, INSERT_HOLDS, INSERT_LEDGER, LEDGER_COLUMNS,
                           LOCK_EMAILS, MIGRATIONS, PRUNE_HOLDS, READ_STATE, RULE_COLUMNS, SETTLE, USER_ORDER, USERS)

MIGRATE_LOCK = "aipipe.migrate:"  # hashed with the schema name into the migration lock's key

# What a dropped connection, a stopped or restarting server, or a timeout raise.
DB_ERRORS = (OSError, asyncio.TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)
# What a row PostgreSQL will not take raises (data exceptions, constraint violations; asyncpg's own
# DataError when an argument cannot be encoded): the same rows fail again, however often retried.
REFUSED = (asyncpg.DataError, asyncpg.IntegrityConstraintViolationError, UnicodeError)


def parse_url(url: str) -> tuple[str, str | None, float, float]:
    """Split AI Pipe's own parameters off a postgresql:// URL: (dsn for asyncpg, schema, connect_timeout, command_timeout)."""
    parts = urlsplit(url)
    query, schema, connect_timeout, command_timeout = [], None, 5.0, 30.0
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key == "schema":
            schema = value or None
        elif key == "connect_timeout":
            connect_timeout = float(value)
        elif key == "command_timeout":
            command_timeout = float(value)
        else:
            query.append((key, value))
    if connect_timeout <= 0 or command_timeout <= 0:
        raise ValueError("connect_timeout and command_timeout must be positive")
    return urlunsplit(parts._replace(query=urlencode(query))), schema, connect_timeout, command_timeout


def quote_ident(name: str) -> str:
    """A SQL identifier, double-quoted."""
    return '"' + name.replace('"', '""') + '"'


def ledger_record(c: Charge) -> tuple:
    """A Charge as one row of INSERT_LEDGER's arrays."""
    return charge_row(c)


def columns(rows: list[tuple], width: int) -> list[list]:
    """Rows to `width` column arrays (for unnest); empty lists when there are no rows."""
    return [list(col) for col in zip(*rows)] if rows else [[] for _ in range(width)]


class PostgresStore(Store):
    """Budgets, holds and the ledger in PostgreSQL, shared by any number of server processes."""

    def __init__(self, url: str, pool_min: int = 1, pool_max: int = 10):
        from . import StoreConfigError, mask_url

        self.url = url
        try:
            self.dsn, self.schema, self.connect_timeout, self.command_timeout = parse_url(url)
        except ValueError as e:
            raise StoreConfigError(f"storage URL {mask_url(url)} is malformed: {e}") from None
        self.pool_min, self.pool_max = max(0, pool_min), max(1, pool_max, pool_min)
        self._pool: asyncpg.Pool | None = None

    async def setup(self) -> None:
        """Open the pool and apply pending migrations under an advisory lock."""
        # A transaction left open by a connection that vanished mid-commit holds its users' locks (and makes a
        # release of its holds wait): the server ends it once it has sat idle as long as a statement may take.
        settings = {"idle_in_transaction_session_timeout": str(int(self.command_timeout * 1000))}
        if self.schema:
            settings["search_path"] = quote_ident(self.schema)
        try:
            self._pool = await asyncio.wait_for(asyncpg.create_pool(
                self.dsn, min_size=self.pool_min, max_size=self.pool_max, timeout=self.connect_timeout,
                command_timeout=self.command_timeout, max_inactive_connection_lifetime=300.0,
                server_settings=settings), timeout=self.connect_timeout * max(1, self.pool_min) + 5)
        except asyncio.TimeoutError:
            raise StoreUnavailable(f"no answer within {self.connect_timeout:g}s") from None
        async with self._pool.acquire() as conn:
            async with conn.transaction():
                schema = self.schema or await conn.fetchval("SELECT current_schema()") or "public"
                await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", MIGRATE_LOCK + schema)
                # Look first: CREATE SCHEMA IF NOT EXISTS wants CREATE on the database even when the schema
                # exists, which a least-privilege user given a schema made by the DBA does not have.
                if self.schema and not await conn.fetchval(
                        "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)", self.schema):
                    await conn.execute(f"CREATE SCHEMA {quote_ident(self.schema)}")
                await conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL, "
                                   "applied TIMESTAMPTZ NOT NULL DEFAULT now())")
                current = await conn.fetchval("SELECT COALESCE(MAX(version), 0) FROM schema_version")
                for version, script in enumerate(MIGRATIONS[current:], start=current + 1):
                    await conn.execute(script)
                    await conn.execute("INSERT INTO schema_version (version) VALUES ($1)", version)

    async def close(self) -> None:
        """Close the pool (waiting briefly for connections in use)."""
        pool, self._pool = self._pool, None
        if pool is None:
            return
        try:
            await asyncio.wait_for(pool.close(), 10)
        except (asyncio.TimeoutError, *DB_ERRORS):
            pool.terminate()

    @asynccontextmanager
    async def _connection(self):
        """A pooled connection; database errors become StoreUnavailable."""
        if self._pool is None:
            raise StoreUnavailable("PostgreSQL store is closed")
        try:
            async with self._pool.acquire(timeout=self.connect_timeout + self.command_timeout) as conn:
                yield conn
        except REFUSED as e:
            raise RowRefused(f"PostgreSQL: {type(e).__name__}: {' '.join(str(e).split())}") from e
        except DB_ERRORS as e:
            raise unavailable(e) from e

    @asynccontextmanager
    async def _transaction(self):
        """A pooled connection inside a transaction."""
        async with self._connection() as conn:
            async with conn.transaction():
                yield conn

    async def _execute(self, query: str, *args) -> None:
        """One statement on its own (atomic by itself)."""
        async with self._connection() as conn:
            await conn.execute(query, *args)

    async def _fetch(self, query: str, *args) -> list:
        async with self._connection() as conn:
            return await conn.fetch(query, *args)

    async def reserve(self, requests: list[HoldRequest], now: float) -> list[Decision]:
        """Admit and hold each request in order; emails locked across instances for the transaction."""
        emails = sorted({r.email for r in requests})
        since = min(r.since for r in requests)
        placed: list[tuple[int, str]] = []
        try:
            async with self._transaction() as conn:
                await conn.execute(LOCK_EMAILS, emails)
                rows = await conn.fetch(READ_STATE, emails, since, now, now - RATE_WINDOW)
                states = {e: UserState(daily=[]) for e in emails}
                for kind, email, day, amount, created, is_open in rows:
                    if kind == 0:
                        states[email].daily.append((day, float(amount)))
                    else:
                        add_hold(states[email], float(amount), created, is_open, now)
                admissions, holds = decide_batch(requests, states, now, lambda: secrets.randbits(62))
                if holds:
                    placed = [(h[0], h[1]) for h in holds]
                    await conn.execute(INSERT_HOLDS, *columns(holds, 5))
        except StoreUnavailable as e:
            # the COMMIT may have landed with its answer lost: holds nobody will settle would count as
            # requests in flight until they expire, so the caller releases them once the store is back
            e.placed = tuple(placed)
            raise
        return admissions

    async def settle(self, charges: list[Charge]) -> None:
        """Ledger rows, daily totals and hold releases for a batch, in one statement (one round trip)."""
        billed = [ledger_record(c) for c in charges if c.kind != "release"]
        released = dict(sorted((c.hold_id, c.email) for c in charges if c.hold_id is not None))
        await self._execute(SETTLE, *columns(billed, 14), list(released), list(released.values()))

    async def spend(self, email: str, since: date) -> float:
        """Settled cost in the window."""
        rows = await self._fetch("SELECT COALESCE(SUM(cost), 0) FROM usage WHERE email = $1 AND date >= $2",
                                 email, since)
        return float(rows[0][0])

    async def open_holds(self, email: str, now: float) -> float:
        """USD held by requests in flight."""
        rows = await self._fetch(
            "SELECT COALESCE(SUM(amount), 0) FROM holds WHERE email = $1 AND NOT released AND expires > $2",
            email, now)
        return float(rows[0][0])

    async def daily_usage(self, email: str, since: date) -> list[tuple[str, float]]:
        """Days with spend, oldest first."""
        rows = await self._fetch("SELECT date, cost FROM usage WHERE email = $1 AND date >= $2 ORDER BY date",
                                 email, since)
        return [(d.isoformat(), float(c)) for d, c in rows]

    async def usage_by_model(self, email: str, since: date) -> list[dict]:
        """Ledger sums per provider and model."""
        rows = await self._fetch(BY_MODEL, *ADJUSTMENTS, email, since)
        return [model_row(r) for r in rows]

    async def all_usage(self, email=None, since=None, until=None, limit=1000, offset=0) -> list[dict]:
        """Daily totals of everyone, newest first."""
        where, args = usage_filter(email, since, until, mark=lambda i: f"${i}", dates_as_text=False)
        n = len(args)
        rows = await self._fetch(
            f"SELECT email, date, cost FROM usage {where} ORDER BY date DESC, email LIMIT ${n + 1} OFFSET ${n + 2}",
            *args, limit, offset)
        return [{"email": e, "date": d.isoformat(), "cost": float(c)} for e, d, c in rows]

    async def set_cost(self, email: str, day: date, cost: float, now: float) -> None:
        """Overwrite a day's total; the difference goes in the ledger as an adjustment."""
        async with self._transaction() as conn:
            # Lock the row first, so a settlement committing meanwhile is neither lost nor double counted.
            await conn.execute("INSERT INTO usage (email, date, cost) VALUES ($1, $2, 0) ON CONFLICT DO NOTHING",
                               email, day)
            old = await conn.fetchval("SELECT cost FROM usage WHERE email = $1 AND date = $2 FOR UPDATE", email, day)
            adjust = Charge(email=email, day=day, cost=cost - float(old), kind="adjust", ts=now)
            await conn.execute(INSERT_LEDGER, *columns([ledger_record(adjust)], 14))
            await conn.execute("UPDATE usage SET cost = $3 WHERE email = $1 AND date = $2", email, day, cost)

    async def ledger(self, email: str | None = None, limit: int = 100) -> list[dict]:
        """Newest ledger rows."""
        if email:
            rows = await self._fetch(f"SELECT id, {LEDGER_COLUMNS} FROM ledger WHERE email = $1 ORDER BY id DESC LIMIT $2",
                                     email, limit)
        else:
            rows = await self._fetch(f"SELECT id, {LEDGER_COLUMNS} FROM ledger ORDER BY id DESC LIMIT $1", limit)
        return [{**dict(r), "date": r["date"].isoformat()} for r in rows]

    async def prune(self, now: float) -> None:
        """Forget holds that no longer count for anything (skipping rows a settlement holds locked)."""
        async with self._transaction() as conn:
            await conn.execute(PRUNE_HOLDS, now - 2 * RATE_WINDOW, now)

    async def rules_version(self) -> int:
        """The budget rules' version: one row read."""
        async with self._connection() as conn:
            return int(await conn.fetchval("SELECT version FROM rules_version"))

    async def budget_rules(self) -> tuple[int, list[dict]]:
        """The version and the rules, from one snapshot."""
        async with self._connection() as conn:
            async with conn.transaction(isolation="repeatable_read", readonly=True):
                version = await conn.fetchval("SELECT version FROM rules_version")
                rows = await conn.fetch(f"SELECT {RULE_COLUMNS} FROM budget_rules ORDER BY match")
        return int(version), [rule_row(*r) for r in rows]

    async def set_budget_rule(self, rule: dict, admin: str, now: float) -> int:
        """Insert or replace a rule, bump the version and audit it, in one transaction."""
        async with self._transaction() as conn:
            before = await self._rule(conn, rule["match"], lock=True)
            await conn.execute(f"""INSERT INTO budget_rules ({RULE_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7)
                ON CONFLICT (match) DO UPDATE SET limit_usd = excluded.limit_usd, days = excluded.days,
                period = excluded.period, models = excluded.models, updated = excluded.updated,
                updated_by = excluded.updated_by""", rule["match"], float(rule["limit"]), rule["days"], rule["period"],
                json.dumps(list(rule["models"])), now, admin)
            detail = {**budget_detail(rule), "previous": budget_detail(before)}
            await conn.execute(INSERT_AUDIT, now, admin, "budget.set", rule["match"], json.dumps(detail))
            return int(await conn.fetchval(BUMP_VERSION))

    async def remove_budget_rule(self, match: str, admin: str, now: float) -> dict | None:
        """Delete a rule, bump the version and audit it, in one transaction."""
        async with self._transaction() as conn:
            before = await self._rule(conn, match, lock=True)
            if before is None:
                return None
            await conn.execute("DELETE FROM budget_rules WHERE match = $1", match)
            await conn.execute(INSERT_AUDIT, now, admin, "budget.remove", match,
                               json.dumps({"removed": budget_detail(before)}))
            await conn.execute(BUMP_VERSION)
            return before

    @staticmethod
    async def _rule(conn, match: str, lock: bool = False) -> dict | None:
        row = await conn.fetchrow(f"SELECT {RULE_COLUMNS} FROM budget_rules WHERE match = $1"
                                  + (" FOR UPDATE" if lock else ""), match)
        return rule_row(*row) if row else None

    async def add_audit(self, admin: str, action: str, target: str, detail: dict, now: float) -> None:
        """One audit row."""
        await self._execute(INSERT_AUDIT, now, admin, action, target, json.dumps(detail))

    async def audit(self, limit: int = 100, offset: int = 0) -> list[dict]:
        """Audit rows, newest first."""
        rows = await self._fetch("SELECT id, ts, admin, action, target, detail FROM audit ORDER BY id DESC "
                                 "LIMIT $1 OFFSET $2", limit, offset)
        return [audit_row(*r) for r in rows]

    async def users_summary(self, windows: list[tuple[str, date, float]], today: date, query: UsersQuery) -> dict:
        """Everyone's spend, requests and last call in their window: filtered, sorted and paged in one query."""
        matches, firsts, limits = columns([(m, since, float(limit)) for m, since, limit in windows], 3)
        args = (matches, firsts, limits, min(firsts + [today]), today, query.search.lower())
        order = f"{USER_ORDER[query.sort]} {'DESC' if query.descending else 'ASC'}, email"
        rows = await self._fetch(f"{USERS} ORDER BY {order} LIMIT $7 OFFSET $8", *args, query.limit, query.offset)
        if not rows and query.offset:  # past the last page: still say how many there are
            rows = await self._fetch(f"{USERS} LIMIT 1", *args)
            return {"total": rows[0][5] if rows else 0, "data": []}
        return {"total": rows[0][5] if rows else 0, "data": [user_row(*r[:5]) for r in rows]}


class OneLineErrors(logging.Filter):
    """Log a record's exception as `: Type: message` on the same line instead of a traceback.

    asyncpg's pool logs a full traceback each time it fails to reconnect its floor connections;
    during an outage that would flood the log with identical tracebacks.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None:
            e = record.exc_info[1]
            record.msg = f"{record.getMessage()}: {type(e).__name__}: {' '.join(str(e).split())}"
            record.args, record.exc_info, record.exc_text = None, None, None
        return True


logging.getLogger("asyncpg.pool").addFilter(OneLineErrors())


def unavailable(e: BaseException) -> StoreUnavailable:
    """A driver or network error as StoreUnavailable, in one line."""
    text = " ".join(str(e).split()) or "no answer in time"
    return StoreUnavailable(f"PostgreSQL: {type(e).__name__}: {text}")
