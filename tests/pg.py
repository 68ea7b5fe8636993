"""Postgres for tests: a schema of its own per test in database `test`, dropped afterwards.

The URL handed to the store is conftest.POSTGRES_URL + `?schema=<name>`: PostgresStore puts its
tables in that schema (search_path). Postgres being unreachable fails the test loudly; it is
never skipped (CI starts PostgreSQL and the suite is mandatory).
"""
from __future__ import annotations

import asyncio
import re
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from .conftest import POSTGRES_URL


def _run(coro):
    """Run a coroutine on a private loop, leaving the test's IOLoop (and the current loop) alone."""
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(coro)
    finally:
        loop.close()


async def _admin(sql: str) -> None:
    try:
        conn = await asyncpg.connect(POSTGRES_URL, timeout=10)
    except Exception as e:
        pytest.fail(f"PostgreSQL is required for these tests and is unreachable at {POSTGRES_URL}: "
                    f"{type(e).__name__}: {e} (start it: pg_ctlcluster --skip-systemctl-redirect 15 main start)",
                    pytrace=False)
    try:
        await conn.execute("SET lock_timeout = '20s'")
        await conn.execute(sql)
    finally:
        await conn.close()


def schema_url(schema: str, base: str = POSTGRES_URL, **params: str) -> str:
    """base with ?schema=<schema> (and any other query parameters) added."""
    query = "&".join([f"schema={schema}"] + [f"{k}={v}" for k, v in params.items()])
    return f"{base}{'&' if '?' in base else '?'}{query}"


def with_port(url: str, host: str, port: int) -> str:
    """url pointing at host:port instead (user, database and query kept)."""
    parts = urlsplit(url)
    auth = parts.netloc.rsplit("@", 1)[0] + "@" if "@" in parts.netloc else ""
    return urlunsplit(parts._replace(netloc=f"{auth}{host}:{port}"))


def fresh_postgres_url(request, name: str) -> str:
    """Create schema `name` in the test database, drop it when `request` finishes, return its URL."""
    if request.config.getoption("--sqlite-only"):
        pytest.skip("Postgres test skipped by --sqlite-only (never in CI)")
    if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", name):
        raise ValueError(f"unsafe schema name {name!r}")
    _run(_admin(f"CREATE SCHEMA {name}"))
    request.addfinalizer(lambda: _run(_admin(f"DROP SCHEMA IF EXISTS {name} CASCADE")))
    return schema_url(name)
