"""Budget integrity under concurrency: bursts never overspend the limit, on SQLite and Postgres in one
process, and with two real server processes sharing one Postgres database.

Also across two instances: the in-flight cap and requests-per-minute limit hold (429 + Retry-After),
and POST /admin/cost on one instance takes effect at once on the other.
"""
from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import orjson
import pytest
from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest

from aipipe.budget import today_utc
from aipipe.storage import open_store

from .conftest import ENV, token
from .fake_upstream import open_gate_once_decided
from .helpers import chat, settled
from .pg import fresh_postgres_url

BURST = 50
USER = "burst@example.com"
ROOT = Path(__file__).resolve().parent.parent


class Client:
    """Many requests at once (Tornado's shared client would queue all but 10)."""

    def __init__(self):
        self.http = AsyncHTTPClient(force_instance=True, max_clients=4 * BURST)
        self.answered = 0  # chat calls answered so far

    async def chat(self, base: str, email: str, **body):
        req = HTTPRequest(base + "/openai/v1/chat/completions", method="POST", body=orjson.dumps(chat(**body)),
                          headers={"Authorization": f"Bearer {token(email)}", "Content-Type": "application/json"},
                          request_timeout=60)
        try:
            return await self.http.fetch(req, raise_error=False)
        finally:
            self.answered += 1

    async def post(self, base: str, path: str, email: str, data: dict):
        req = HTTPRequest(base + path, method="POST", body=orjson.dumps(data),
                          headers={"Authorization": f"Bearer {token(email)}"}, request_timeout=30)
        return await self.http.fetch(req, raise_error=False)

    async def burst(self, bases: list[str], email: str, n: int = BURST, **body) -> list:
        return await asyncio.gather(*(self.chat(bases[i % len(bases)], email, **body) for i in range(n)))

    async def held_burst(self, upstream, bases: list[str], email: str, n: int = BURST, **body) -> list:
        """A burst whose admitted calls all stay upstream until every one of the n was decided: admitted (it
        reached the fake upstream, whose gate holds it) or refused (answered). So each admission is decided
        with all the others admitted before it still in flight, however slowly a loaded machine starts them."""
        upstream.state.gate = asyncio.Event()
        seen, answered = len(upstream.state.requests), self.answered
        responses, _ = await asyncio.gather(
            self.burst(bases, email, n, **body),
            open_gate_once_decided(upstream.state, seen + n, lambda: self.answered - answered))
        return responses

    def close(self):
        self.http.close()


@pytest.fixture
def client():
    c = Client()
    yield c
    c.close()


def message(response) -> str:
    return orjson.loads(response.body)["message"]


async def check_burst(store, responses, email: str, limit: float, spent_before: float) -> dict:
    """The measurement: total charged <= limit, and every 200 has exactly one ledger row."""
    ok = [r for r in responses if r.code == 200]
    refused = [r for r in responses if r.code == 429]
    assert len(ok) + len(refused) == len(responses), sorted({r.code for r in responses})
    for r in refused:
        assert message(r).startswith("Usage $") and " in 1 days" in message(r), message(r)
    rows = [r for r in await store.ledger(email, limit=10_000) if r["kind"] == "request"]
    assert len(rows) == len(ok)  # every successful response was charged, once
    assert sum(r["cost"] for r in rows) == pytest.approx(sum(float(r.headers["X-AIPipe-Cost"]) for r in ok))
    total = await store.spend(email, today_utc())
    assert total == pytest.approx(spent_before + sum(r["cost"] for r in rows))
    assert total <= limit + 1e-9
    assert 1 <= len(ok) < len(responses)
    return {"ok": len(ok), "refused": len(refused), "total": total}


# --- (a) one process, each backend ------------------------------------------------------------------

# remaining budget and request shape: without max_tokens a gpt-4o-mini call holds its 16,384 output tokens
# (about $0.0098), so $0.015 lets exactly one through; holds from max_tokens (about $0.00004) let a few through
SHAPES = {"no_max_tokens": (0.015, {}), "max_tokens": (0.0001, {"max_tokens": 50})}


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.gen_test(timeout=60)
async def test_burst_in_one_process_never_overspends(store_kind, make_gateway, serve, upstream, client, shape):
    remaining, body = SHAPES[shape]
    limit = 0.05
    gw = await make_gateway(budget={USER: {"limit": limit, "days": 1}}, limits={"max_concurrent_per_user": 0})
    base = serve(gw)
    await gw.store.set_cost(USER, today_utc(), limit - remaining, time.time())
    responses = await client.held_burst(upstream, [base], USER, **body)  # all 50 decided with the admitted in flight
    await settled(gw)
    got = await check_burst(gw.store, responses, USER, limit, limit - remaining)
    if shape == "no_max_tokens":
        assert got["ok"] == 1
    else:
        assert got["ok"] >= 2  # tight holds admit several, and still no overspend
    assert await gw.store.open_holds(USER, time.time()) == 0


# --- (b) two server processes on one Postgres -----------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def toml_config(storage_url: str, upstream_url: str, limits: dict, budgets: dict, admission: str = "auto") -> str:
    lines = ["[storage]", f'url = "{storage_url}"', "pool_min = 1", "pool_max = 5", f'admission = "{admission}"', "",
             "[auth]", 'admins = ["admin@example.com"]', "", "[budget]"]
    lines += [f'"{who}" = {{ limit = {b["limit"]}, days = {b["days"]} }}' for who, b in budgets.items()]
    lines += ["", "[providers.openai]", f'base_url = "{upstream_url}"',
              "", "[providers.openrouter]", f'base_url = "{upstream_url}/api"', "", "[limits]"]
    lines += [f"{k} = {v}" for k, v in limits.items()]
    return "\n".join(lines) + "\n"


class Instances:
    """Two `python -m aipipe serve` processes on two loopback ports sharing one Postgres schema."""

    def __init__(self, tmp: Path, storage_url: str):
        self.tmp, self.storage_url = tmp, storage_url
        self.procs: list[subprocess.Popen] = []
        self.bases: list[str] = []

    async def start(self, upstream_url: str, limits: dict, budgets: dict, n: int = 2, admission: str = "auto") -> list[str]:
        config = self.tmp / "aipipe.toml"
        config.write_text(toml_config(self.storage_url, upstream_url, limits, budgets, admission))
        env = {**os.environ, **ENV, "PYTHONPATH": str(ROOT)}
        for i in range(n):
            port = free_port()
            log = open(self.tmp / f"server{i}.log", "wb")
            self.procs.append(subprocess.Popen(
                [sys.executable, "-m", "aipipe", "serve", "--config", str(config), "--env-file", str(self.tmp / ".env"),
                 "--host", "127.0.0.1", "--port", str(port)], cwd=self.tmp, env=env, stdout=log, stderr=log))
            self.bases.append(f"http://127.0.0.1:{port}")
        http = AsyncHTTPClient(force_instance=True)
        try:
            for base, proc in zip(self.bases, self.procs):
                for _ in range(600):
                    if proc.poll() is not None:
                        raise AssertionError(f"server exited with {proc.returncode}:\n{self.logs()}")
                    try:
                        r = await http.fetch(base + "/nothing-here", raise_error=False, request_timeout=10)
                        if r.code == 404:
                            break
                    except (OSError, HTTPClientError):  # not listening yet, or too slow to answer (timeout: 599)
                        pass
                    await asyncio.sleep(0.05)
                else:
                    raise AssertionError(f"server at {base} did not come up:\n{self.logs()}")
        finally:
            http.close()
        return self.bases

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace")[-3000:] for p in sorted(self.tmp.glob("server*.log")))

    async def astop(self, timeout: float = 30.0) -> None:
        """SIGTERM and wait without blocking the loop (which may run the upstream or a proxy they need)."""
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while any(p.poll() is None for p in self.procs) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self.stop()

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


@pytest.fixture
def pg_url(request):
    return fresh_postgres_url(request, f"t_{uuid.uuid4().hex[:12]}")


@pytest.fixture
def instances(tmp_path, pg_url):
    inst = Instances(tmp_path, pg_url)
    yield inst
    inst.stop()
    for p in inst.procs:
        assert p.returncode == 0, f"server exited with {p.returncode}:\n{inst.logs()}"


@pytest.fixture
def pg_store(io_loop, pg_url):
    """The test's own view of the shared database."""
    store = io_loop.run_sync(lambda: open_store(pg_url))
    yield store
    io_loop.run_sync(store.close)


async def wait_written(store, email: str, rows: int, timeout: float = 10.0) -> None:
    """Wait until `rows` request rows for email are in the ledger (the servers settle asynchronously)."""
    deadline = time.monotonic() + timeout
    while True:
        got = [r for r in await store.ledger(email, limit=10_000) if r["kind"] == "request"]
        if len(got) >= rows or time.monotonic() > deadline:
            return
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.gen_test(timeout=90)
async def test_burst_across_two_instances_never_overspends(instances, pg_store, upstream, client, shape):
    remaining, body = SHAPES[shape]
    limit = 0.05
    bases = await instances.start(upstream.url, {"max_concurrent_per_user": 0},
                                  {"*": {"limit": 1.0, "days": 7}, USER: {"limit": limit, "days": 1}})
    await pg_store.set_cost(USER, today_utc(), limit - remaining, time.time())
    responses = await client.held_burst(upstream, bases, USER, **body)
    ok = sum(r.code == 200 for r in responses)
    await wait_written(pg_store, USER, ok)
    got = await check_burst(pg_store, responses, USER, limit, limit - remaining)
    if shape == "no_max_tokens":
        assert got["ok"] == 1  # one call for both instances together, not one each
    served_by = {r.effective_url.split("/openai/")[0] for r in responses if r.code == 200}
    assert served_by <= set(bases)
    assert await pg_store.open_holds(USER, time.time()) == 0


@pytest.mark.gen_test(timeout=90)
async def test_concurrency_cap_holds_across_instances(instances, pg_store, upstream, client):
    bases = await instances.start(upstream.url, {"max_concurrent_per_user": 4},
                                  {"*": {"limit": 10.0, "days": 7}})
    responses = await client.held_burst(upstream, bases, "many@example.com", n=20)  # the admitted stay in flight
    ok = [r for r in responses if r.code == 200]
    refused = [r for r in responses if r.code == 429]
    assert len(ok) == 4, [(r.code, r.body[:80]) for r in responses]  # 4 for both instances, not 4 each
    assert len(refused) == 16
    for r in refused:
        assert message(r) == "Too many requests in flight (at most 4 at once)"
        assert int(r.headers["Retry-After"]) >= 1
    # both instances refused some: the cap was shared, not enforced by one process alone
    assert {r.effective_url.split("/openai/")[0] for r in refused} == set(bases)
    await wait_written(pg_store, "many@example.com", 4)
    again = await client.burst(bases, "many@example.com", n=2)  # the slots are free again
    assert [r.code for r in again] == [200, 200]


@pytest.mark.gen_test(timeout=90)
async def test_rpm_limit_holds_across_instances(instances, upstream, client):
    bases = await instances.start(upstream.url, {"max_concurrent_per_user": 0, "rpm_per_user": 5},
                                  {"*": {"limit": 10.0, "days": 7}})
    codes, retry = [], []
    for i in range(12):  # one at a time, alternating instances
        r = await client.chat(bases[i % 2], "rpm@example.com")
        codes.append(r.code)
        if r.code == 429:
            assert message(r) == "Rate limit: at most 5 requests per minute"
            retry.append(int(r.headers["Retry-After"]))
    assert codes == [200] * 5 + [429] * 7
    assert all(1 <= s <= 60 for s in retry) and retry[0] >= 50
    other = await client.chat(bases[1], "someone-else@example.com")
    assert other.code == 200  # per user


@pytest.mark.gen_test(timeout=90)
async def test_admin_cost_takes_effect_at_once_on_the_other_instance(instances, pg_store, upstream, client):
    a, b = await instances.start(upstream.url, {"max_concurrent_per_user": 8},
                                 {"*": {"limit": 1.0, "days": 7}})
    user, today = "adjusted@example.com", today_utc().isoformat()
    assert (await client.chat(b, user)).code == 200
    await wait_written(pg_store, user, 1)  # else its charge may land on top of the overwrite below
    r = await client.post(a, "/admin/cost", "admin@example.com", {"email": user, "date": today, "cost": 1.5})
    assert r.code == 200, r.body
    refused = await client.chat(b, user)  # the very next request, on the other instance
    assert refused.code == 429 and message(refused).startswith("Usage $1.5 / $1 in 7 days"), refused.body
    r = await client.post(b, "/admin/cost", "admin@example.com", {"email": user, "date": today, "cost": 0})
    assert r.code == 200
    assert (await client.chat(a, user)).code == 200
    await wait_written(pg_store, user, 2)
    rows = await pg_store.ledger(user, limit=100)
    assert sorted(r["kind"] for r in rows) == ["adjust", "adjust", "request", "request"]
    assert await pg_store.spend(user, today_utc()) == pytest.approx(sum(r["cost"] for r in rows))


# --- (c) two server processes on one SQLite file ---------------------------------------------------------

@pytest.mark.gen_test(timeout=90)
async def test_burst_across_two_servers_sharing_one_sqlite_file_never_overspends(tmp_path, upstream, client):
    url = f"sqlite:///{tmp_path}/shared.db"
    inst = Instances(tmp_path, url)
    try:
        bases = await inst.start(upstream.url, {"max_concurrent_per_user": 0},
                                 {"*": {"limit": 1.0, "days": 7}, USER: {"limit": 0.05, "days": 1}}, admission="store")
        store = await open_store(url)
        remaining, body = SHAPES["no_max_tokens"]
        await store.set_cost(USER, today_utc(), 0.05 - remaining, time.time())
        responses = await client.held_burst(upstream, bases, USER, **body)
        ok = sum(r.code == 200 for r in responses)
        await wait_written(store, USER, ok)
        got = await check_burst(store, responses, USER, 0.05, 0.05 - remaining)
        assert got["ok"] == 1  # one call's most for both servers together
        await store.close()
    finally:
        await inst.astop()
    assert [p.returncode for p in inst.procs] == [0, 0], inst.logs()


@pytest.mark.gen_test(timeout=60)
async def test_second_server_on_a_file_another_keeps_in_memory_refuses_to_start(tmp_path, upstream):
    inst = Instances(tmp_path, f"sqlite:///{tmp_path}/one.db")
    try:
        with pytest.raises(AssertionError, match="already used by another AI Pipe server"):
            await inst.start(upstream.url, {}, {"*": {"limit": 1.0, "days": 7}})
        await asyncio.sleep(0.5)
        codes = sorted((p.poll() for p in inst.procs), key=str)
        assert codes == [1, None]  # whichever came second exited; the other keeps serving
    finally:
        await inst.astop()
