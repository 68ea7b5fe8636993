"""Small helpers shared by the gateway tests."""
from __future__ import annotations

import asyncio
import subprocess
import time
import urllib.error
import urllib.request

import orjson


async def settled(gateway, timeout: float = 30.0) -> None:
    """Wait until every charge queued so far is committed (StoreUnavailable after `timeout` seconds)."""
    await gateway.ledger.flush(timeout)


async def calls_finished(app, gateway, timeout: float = 30.0) -> None:
    """Wait for the provider calls in flight to end (a client that left does not end one), then for their charges."""
    tasks = list(app.open_requests.tasks)
    if tasks:
        await asyncio.wait(tasks, timeout=timeout)
    await gateway.ledger.flush(timeout)


async def leave_mid_stream(port: int, path: str, headers: dict, body: bytes, until: bytes) -> bytes:
    """POST body to path, read the answer up to `until`, and hang up; returns what was read."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json",
             f"Content-Length: {len(body)}", *(f"{k}: {v}" for k, v in headers.items())]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
    try:
        return await asyncio.wait_for(reader.readuntil(until), 30)
    finally:
        writer.close()


async def spent(gateway, email: str) -> float:
    """Total cost on the user's ledger (all days)."""
    await settled(gateway)
    rows = await gateway.store.ledger(email, limit=10000)
    return sum(r["cost"] for r in rows)


def chat(model: str = "gpt-4o-mini", stream: bool = False, **extra) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": "Say hello"}], **extra}
    if stream:
        body["stream"] = True
    return body


def sse_data(body: bytes) -> list:
    """The JSON payloads of an SSE body (skipping comments and [DONE])."""
    out = []
    for block in body.replace(b"\r\n", b"\n").split(b"\n\n"):
        for line in block.split(b"\n"):
            if line.startswith(b"data: ") and line != b"data: [DONE]":
                out.append(orjson.loads(line[6:]))
    return out


def message(response) -> str:
    return orjson.loads(response.body)["message"]


# What the garbage collector logs, whenever it runs, about a task or future some earlier test left behind
LEFT_BY_ANOTHER_TEST = ("Task exception was never retrieved", "Future exception was never retrieved")


def tracebacks(records) -> list:
    """The captured log records with a traceback from this test's own doings: aipipe's and Tornado's loggers,
    and asyncio's (a failing callback on the loop) except its notes about tasks some earlier test left behind."""
    def ours(record) -> bool:
        if record.name == "asyncio":
            return not record.getMessage().startswith(LEFT_BY_ANOTHER_TEST)
        return record.name.split(".", 1)[0] in ("aipipe", "tornado")
    return [r for r in records if r.exc_info and ours(r)]


async def raw_request(base_url: str, method: str, target: str, headers: dict | list | None = None,
                      body: bytes = b"") -> tuple[int, dict, bytes]:
    """Send one request exactly as written (no client normalises its path or joins repeated headers: `headers`
    may be a list of (name, value) pairs) and read the answer to its end.

    Returns (status, headers with lower-case names, body); the connection is closed after the answer."""
    host, port = base_url.split("//", 1)[1].rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}:{port}", "Connection: close"]
    pairs = headers.items() if isinstance(headers, dict) else headers or []
    lines += [f"{k}: {v}" for k, v in pairs]
    if body:
        lines.append(f"Content-Length: {len(body)}")
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
    try:
        raw = await asyncio.wait_for(reader.read(-1), 30)
    finally:
        writer.close()
    head, _, rest = raw.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    found = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        found[name.strip().lower()] = value.strip()
    if "chunked" in found.get("transfer-encoding", ""):
        out, pos = b"", 0
        while True:
            end = rest.index(b"\r\n", pos)
            size = int(rest[pos:end], 16)
            if size == 0:
                break
            out += rest[end + 2:end + 2 + size]
            pos = end + 4 + size
        rest = out
    return int(status_line.split()[1]), found, rest


def serving(port: int) -> bool:
    """Whether a server answers HTTP on port (any status counts). It binds its port before it opens its store and
    answers only after, so a connect alone would not do; a connect the listen backlog took waits for the answer
    (60 s, a hang guard)."""
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=60).close()
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False
    return True


def wait_serving(port: int, proc: subprocess.Popen, tries: int = 300) -> bool:
    """Whether the server process came to answer on port, trying every 0.1 s while it is not listening yet
    (bounded); False at once if it exited."""
    for _ in range(tries):
        if proc.poll() is not None:
            return False
        if serving(port):
            return True
        time.sleep(0.1)
    return False
