"""Soaks against a real `aipipe serve` process and a fake provider process, both on loopback.

Many users, OpenAI (chat and Responses API), OpenRouter and Gemini, streams and JSON, concurrent clients, for
a bounded time. Then SIGTERM: the server exits 0 with no traceback in its log, no answer was a 5xx of its own,
and the ledger read from the store holds one row per answer the fake gave, totalling, to 1e-9 USD, the price of
the usage the fake reported (priced with aipipe.pricing, or OpenRouter's own cost). A SIGKILL variant checks
that a server killed under load loses at most the charges of its last write window (ledger.LINGER) and of the
calls in flight, and starts again on the same file.
"""
from __future__ import annotations

import asyncio
import collections
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
import uuid

import aiohttp
import asyncpg
import orjson
import pytest

from aipipe.auth import mint_token
from aipipe.ledger import LINGER

from .conftest import ENV, POSTGRES_URL, SECRET
from .soak_support import GEMINI_MODEL, OPENAI_MODEL, OPENROUTER_MODEL, read_records

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
USERS = [f"soak{i:02d}@example.com" for i in range(40)]
KINDS = ["openai-json", "openai-stream", "openai-stream-usage", "responses-json", "responses-stream",
         "openrouter-json", "openrouter-stream", "gemini-json", "gemini-stream"]
MESSAGES = [{"role": "user", "content": "Say hello"}]


def free_ports(n: int) -> list[int]:
    """n different free loopback ports: each stays bound until all are chosen, so no two can be the same."""
    import socket
    held = [socket.socket() for _ in range(n)]
    try:
        for s in held:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in held]
    finally:
        for s in held:
            s.close()


def wait_listening(port: int, proc: subprocess.Popen, log_path: str, tries: int = 300) -> None:
    import socket
    for _ in range(tries):
        if proc.poll() is not None:
            break
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    with open(log_path, errors="replace") as f:
        raise AssertionError(f"process on {port} did not come up:\n{f.read()[-3000:]}")


class Processes:
    """The fake provider and the gateway as child processes, stopped at the end whatever happens."""

    def __init__(self, folder, storage_url: str, seed: int):
        self.folder, self.storage_url = str(folder), storage_url
        self.records = os.path.join(self.folder, "fake-records.jsonl")
        self.fake_port, self.port = free_ports(2)
        self.fake_log = os.path.join(self.folder, "fake.log")
        self.fake = self._spawn([sys.executable, "-m", "tests.soak_support", str(self.fake_port), self.records,
                                 str(seed)], self.fake_log, cwd=REPO)
        wait_listening(self.fake_port, self.fake, self.fake_log)
        upstream = f"http://127.0.0.1:{self.fake_port}"
        self.config = os.path.join(self.folder, "aipipe.toml")
        with open(self.config, "w") as f:
            f.write(f'[storage]\nurl = "{storage_url}"\n\n'
                    '[limits]\nmax_concurrent_per_user = 0\n\n'
                    '[budget]\n"*" = { limit = 100000.0, days = 7 }\n\n'
                    f'[providers.openai]\nbase_url = "{upstream}"\n\n'
                    f'[providers.openrouter]\nbase_url = "{upstream}/api"\n\n'
                    f'[providers.gemini]\nbase_url = "{upstream}"\n')
        self.server: subprocess.Popen | None = None
        self.logs: list[str] = []

    def _spawn(self, cmd, log_path, cwd=None, env=None) -> subprocess.Popen:
        with open(log_path, "ab") as log:
            return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=cwd or self.folder, env=env,
                                    start_new_session=True)

    def start_server(self) -> None:
        log_path = os.path.join(self.folder, f"server-{len(self.logs)}.log")
        self.logs.append(log_path)
        env = {**os.environ, **ENV, "AIPIPE_SECRET": SECRET}
        self.server = self._spawn([sys.executable, "-m", "aipipe", "serve", "--config", self.config, "--host",
                                   "127.0.0.1", "--port", str(self.port), "--env-file",
                                   os.path.join(self.folder, ".env")], log_path, env=env)
        wait_listening(self.port, self.server, log_path)

    def stop_server(self, sig=signal.SIGTERM, timeout: float = 60) -> int:
        self.server.send_signal(sig)
        return self.server.wait(timeout)

    def server_output(self) -> str:
        out = []
        for path in self.logs:
            with open(path, errors="replace") as f:
                out.append(f.read())
        return "\n".join(out)

    def close(self) -> None:
        for proc in (self.server, self.fake):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(10)


def request_for(kind: str) -> tuple[str, dict]:
    if kind.startswith("openai"):
        body = {"model": OPENAI_MODEL, "messages": MESSAGES}
        if kind != "openai-json":
            body["stream"] = True
        if kind == "openai-stream-usage":
            body["stream_options"] = {"include_usage": True}
        return "/openai/v1/chat/completions", body
    if kind.startswith("responses"):
        return "/openai/v1/responses", {"model": OPENAI_MODEL, "input": "Say hello", "stream": kind.endswith("stream")}
    if kind.startswith("openrouter"):
        return "/openrouter/v1/chat/completions", {"model": OPENROUTER_MODEL, "messages": MESSAGES,
                                                   "stream": kind.endswith("stream")}
    action = "streamGenerateContent?alt=sse" if kind.endswith("stream") else "generateContent"
    return (f"/geminiv1beta/models/{GEMINI_MODEL}:{action}",
            {"contents": [{"role": "user", "parts": [{"text": "Say hello"}]}]})


class Load:
    """Concurrent clients calling the gateway until told to stop; what each call got."""

    def __init__(self, base: str, seed: int):
        self.base, self.rng = base, random.Random(seed)
        self.tokens = {u: mint_token(u, SECRET, None) for u in USERS}
        self.statuses: collections.Counter = collections.Counter()
        self.bad: list[str] = []  # answers a client could not use
        self.failed = 0  # calls that got no answer (only when the server is killed)
        self.stop = asyncio.Event()

    async def client(self, session: aiohttp.ClientSession) -> None:
        while not self.stop.is_set():
            kind = self.rng.choice(KINDS)
            user = self.rng.choice(USERS)
            path, body = request_for(kind)
            try:
                async with session.post(self.base + path, data=orjson.dumps(body), headers={
                        "Authorization": f"Bearer {self.tokens[user]}", "Content-Type": "application/json"}) as r:
                    data = await r.read()
                    self.statuses[r.status] += 1
                    self.check(kind, r, data)
            except (aiohttp.ClientError, asyncio.TimeoutError):
                self.failed += 1
                if self.stop.is_set():
                    return

    def check(self, kind: str, r, data: bytes) -> None:
        if r.status != 200:
            self.bad.append(f"{kind}: {r.status} {data[:200]!r}")
        elif r.headers.get("Access-Control-Allow-Origin") != "*":
            self.bad.append(f"{kind}: no CORS header")
        elif kind.endswith("json"):
            orjson.loads(data)
        elif kind.startswith(("openai", "openrouter")) and not data.endswith(b"data: [DONE]\n\n"):
            self.bad.append(f"{kind}: stream ended early: {data[-80:]!r}")
        elif kind == "openai-stream" and b'"choices":[]' in data:
            self.bad.append("openai-stream: the usage chunk the gateway asked for reached the client")

    async def run(self, clients: int, seconds: float, on_the_way=None) -> None:
        timeout = aiohttp.ClientTimeout(total=60)
        async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
            tasks = [asyncio.create_task(self.client(session)) for _ in range(clients)]
            if on_the_way is not None:
                await on_the_way(self)
            else:
                await asyncio.sleep(seconds)
            self.stop.set()
            await asyncio.wait(tasks, timeout=90)


def sqlite_ledger(path: str) -> tuple[list[tuple], float]:
    """(provider, input tokens, output tokens, cost) of each billed row, and the usage table's total."""
    with sqlite3.connect(path) as db:
        rows = db.execute("SELECT provider, input_tokens, output_tokens, cost FROM ledger WHERE kind = 'request'").fetchall()
        total = db.execute("SELECT COALESCE(SUM(cost), 0) FROM usage").fetchone()[0]
    return rows, total


async def postgres_ledger(url: str) -> tuple[list[tuple], float]:
    schema = url.split("schema=", 1)[1].split("&")[0]
    conn = await asyncpg.connect(POSTGRES_URL)
    try:
        rows = await conn.fetch(f"SELECT provider, input_tokens, output_tokens, cost FROM {schema}.ledger "
                                "WHERE kind = 'request'")
        total = await conn.fetchval(f"SELECT COALESCE(SUM(cost), 0) FROM {schema}.usage")
    finally:
        await conn.close()
    return [tuple(r) for r in rows], total


def assert_books_match(procs: Processes, load: Load, rows: list[tuple], usage_total: float) -> None:
    started, ended = read_records(procs.records)
    assert load.bad == [] and load.failed == 0
    assert not [s for s in load.statuses if s >= 500], load.statuses
    assert load.statuses[200] == len(ended) == len(started) > 50, (load.statuses, len(ended), len(started))
    assert all(r["usage"] is not None for r in ended)
    expected = sum(r["price"] for r in ended)
    assert len(rows) == len(ended)
    assert collections.Counter((p, i, o) for p, i, o, _ in rows) == collections.Counter(
        (r["provider"], r["input"], r["output"]) for r in ended)
    assert sum(c for *_, c in rows) == pytest.approx(expected, abs=1e-9)
    assert usage_total == pytest.approx(expected, abs=1e-9)
    assert {r["provider"] for r in ended} == {"openai", "openrouter", "gemini"}


def soak(tmp_path, storage_url: str, seconds: float, clients: int = 16) -> tuple[Processes, Load]:
    seed = random.randrange(1 << 30)
    procs = Processes(tmp_path, storage_url, seed)
    try:
        procs.start_server()
        load = Load(f"http://127.0.0.1:{procs.port}", seed)
        asyncio.run(load.run(clients, seconds))
        assert procs.stop_server() == 0, procs.server_output()[-3000:]
        output = procs.server_output()
        assert "Traceback" not in output, output[-5000:]
        return procs, load
    finally:
        procs.close()


@pytest.fixture
def slow_only(request):
    if "slow" not in (request.config.getoption("-m") or ""):
        pytest.skip("a minute or more: run with -m slow")


def test_short_soak_on_sqlite_bills_exactly_what_the_providers_reported(tmp_path):
    db = tmp_path / "aipipe.db"
    procs, load = soak(tmp_path, f"sqlite:///{db}", seconds=8)
    assert_books_match(procs, load, *sqlite_ledger(str(db)))


def test_short_soak_on_postgres_bills_exactly_what_the_providers_reported(tmp_path, request):
    from .pg import fresh_postgres_url
    url = fresh_postgres_url(request, f"soak_{uuid.uuid4().hex[:12]}")
    procs, load = soak(tmp_path, url, seconds=8)
    assert_books_match(procs, load, *asyncio.run(postgres_ledger(url)))


@pytest.mark.slow
def test_minute_soak_on_sqlite_bills_exactly_what_the_providers_reported(slow_only, tmp_path):
    db = tmp_path / "aipipe.db"
    procs, load = soak(tmp_path, f"sqlite:///{db}", seconds=60, clients=32)
    assert_books_match(procs, load, *sqlite_ledger(str(db)))


KILL_SLACK = 0.15  # seconds beyond LINGER for the fake's last write to reach the gateway and its batch to commit


@pytest.mark.slow
def test_sigkill_under_load_loses_at_most_the_last_write_window(slow_only, tmp_path):
    db = tmp_path / "aipipe.db"
    seed = random.randrange(1 << 30)
    procs = Processes(tmp_path, f"sqlite:///{db}", seed)
    killed_at = []
    try:
        procs.start_server()
        load = Load(f"http://127.0.0.1:{procs.port}", seed)

        async def kill_midway(_load):
            await asyncio.sleep(6)
            killed_at.append(time.time())
            procs.server.send_signal(signal.SIGKILL)
            await asyncio.sleep(0.5)
        asyncio.run(load.run(24, 0, on_the_way=kill_midway))
        procs.server.wait(10)
        time.sleep(0.5)  # the fake finishes writing what it was answering
        rows, usage_total = sqlite_ledger(str(db))
        started, ended = read_records(procs.records)
        kill = killed_at[0]
        late = [r for r in ended if r["t"] >= kill - LINGER - KILL_SLACK]  # finished in the last window, or after
        in_flight = len(started) - len(ended)
        lost = len(ended) - len(rows)
        print(f"SIGKILL: {lost} of {len(ended)} reported charges lost; bound {len(late)} finished late + {in_flight} in flight",
              [sum(r["t"] >= kill - w for r in ended) for w in (0, 0.05, 0.1, 0.15, 0.2, 0.3)])
        assert 0 <= lost <= len(late) + in_flight, (lost, len(late), in_flight)
        billed = collections.Counter((p, i, o) for p, i, o, _ in rows)
        reported = collections.Counter((r["provider"], r["input"], r["output"]) for r in ended)
        assert not billed - reported  # nothing billed that no provider reported
        early = [r for r in ended if r["t"] < kill - LINGER - KILL_SLACK]
        assert not collections.Counter((r["provider"], r["input"], r["output"]) for r in early) - billed
        assert usage_total == pytest.approx(sum(c for *_, c in rows), abs=1e-9)
        assert len(early) > 50 and load.statuses[200] > 50
        # the same file serves again after the crash, and a clean stop writes everything
        procs.start_server()

        async def one_call():
            async with aiohttp.ClientSession() as session:
                async with session.get(f"http://127.0.0.1:{procs.port}/usage", headers={
                        "Authorization": f"Bearer {mint_token(USERS[0], SECRET, None)}"}) as r:
                    return r.status
        assert asyncio.run(one_call()) == 200
        assert procs.stop_server() == 0
        assert "Traceback" not in procs.server_output()
    finally:
        procs.close()
