"""Load generators for the benchmark: wrk for plain requests, an asyncio client for streams.

Both rotate the 64 users' tokens in Authorization and count every non-2xx answer as an error.
Every loop is bounded by a deadline; every socket goes to 127.0.0.1.
"""
from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import statistics
import subprocess
import time
from dataclasses import dataclass, field

WRK_SCRIPT = """
local path, body = %(path)s, %(body)s
local tokens = {%(tokens)s}
local reqs, i = {}, 0
init = function(args)
  for k, t in ipairs(tokens) do
    reqs[k] = wrk.format("POST", path, {["Authorization"] = "Bearer " .. t, ["Content-Type"] = "application/json"}, body)
  end
end
request = function()
  i = i %% #reqs + 1
  return reqs[i]
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('BENCHJSON {"requests":%%d,"duration_us":%%d,"non2xx":%%d,"socket_errors":%%d,' ..
    '"p50_us":%%d,"p99_us":%%d}\\n', summary.requests, summary.duration, e.status,
    e.connect + e.read + e.write + e.timeout, latency:percentile(50), latency:percentile(99)))
end
"""


def lua_string(text: str) -> str:
    return json.dumps(text)  # a JSON string of ASCII is a valid Lua string literal


def have_wrk() -> bool:
    return shutil.which("wrk") is not None


def run_wrk(port: int, path: str, body: bytes, tokens: list[str], concurrency: int, duration: float,
            workdir: str) -> dict:
    """Plain POSTs for `duration` seconds at fixed concurrency; rps over 2xx only, latency in ms."""
    script = os.path.join(workdir, "bench.lua")
    with open(script, "w") as f:
        f.write(WRK_SCRIPT % {"path": lua_string(path), "body": lua_string(body.decode()),
                              "tokens": ", ".join(lua_string(t) for t in tokens)})
    seconds = max(1, round(duration))
    cmd = ["wrk", "-t1", f"-c{concurrency}", f"-d{seconds}s", "--timeout", "5s", "-s", script,
           f"http://127.0.0.1:{port}{path}"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 30)
    match = re.search(r"BENCHJSON (\{.*\})", out.stdout)
    if not match:
        raise RuntimeError(f"wrk gave no summary: {out.stdout[-500:]} {out.stderr[-500:]}")
    r = json.loads(match.group(1))
    ok = r["requests"] - r["non2xx"]
    return {"rps": ok / (r["duration_us"] / 1e6), "p50": r["p50_us"] / 1000, "p99": r["p99_us"] / 1000,
            "ok": ok, "errors": r["non2xx"] + r["socket_errors"]}


@dataclass
class Reply:
    """One request as the client saw it."""

    status: int = 0
    ttfb: float = 0.0  # seconds to the first event (streams) or to the whole body (JSON)
    total: float = 0.0
    events: int = 0
    max_gap: float = 0.0  # longest silence between two reads once the answer started
    error: str = ""
    stats: dict = field(default_factory=dict)


async def read_reply(reader: asyncio.StreamReader, started: float) -> tuple[Reply, bool]:
    """Read one HTTP/1.1 answer; returns it and whether the connection can be reused."""
    reply = Reply()
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").lower()
    reply.status = int(head.split(" ", 2)[1])
    chunked = "transfer-encoding: chunked" in head
    length = re.search(r"content-length: *(\d+)", head)
    last = time.perf_counter()
    body_parts: list[bytes] = []

    def got(data: bytes) -> None:
        nonlocal last
        now = time.perf_counter()
        if body_parts:
            reply.max_gap = max(reply.max_gap, now - last)
        last = now
        if not reply.ttfb and b"data:" in data:
            reply.ttfb = now - started
        body_parts.append(data)

    if chunked:
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            data = await reader.readexactly(size + 2)
            if size == 0:
                break
            got(data[:-2])
    elif length:
        got(await reader.readexactly(int(length.group(1))))
    else:
        got(await reader.read())
    body = b"".join(body_parts)
    reply.total = time.perf_counter() - started
    reply.ttfb = reply.ttfb or reply.total
    reply.events = body.count(b"data:") - body.count(b"data: [DONE]")
    return reply, bool(chunked or length) and "connection: close" not in head


def request_bytes(port: int, path: str, token: str, body: bytes) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {token}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body


async def client_worker(port: int, path: str, body: bytes, tokens: list[str], first: int, deadline: float,
                        max_requests: int, replies: list[Reply], timeout: float) -> None:
    """One connection doing requests back to back until the deadline or max_requests."""
    reader = writer = None
    for n in range(max_requests):
        if time.perf_counter() >= deadline:
            break
        token = tokens[(first + n) % len(tokens)]
        started = time.perf_counter()
        try:
            if writer is None:
                reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 22)
            writer.write(request_bytes(port, path, token, body))
            reply, reusable = await asyncio.wait_for(read_reply(reader, started), timeout)
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError) as e:
            reply, reusable = Reply(error=type(e).__name__, total=time.perf_counter() - started), False
        replies.append(reply)
        if not reusable and writer is not None:
            writer.close()
            reader = writer = None
    if writer is not None:
        writer.close()


async def run_clients(port: int, path: str, body: bytes, tokens: list[str], concurrency: int, duration: float,
                      max_requests: int = 1_000_000, ramp: float = 0.0, timeout: float = 60.0) -> list[Reply]:
    """`concurrency` connections in parallel (opened over `ramp` seconds), each until the deadline."""
    replies: list[Reply] = []
    deadline = time.perf_counter() + duration
    tasks = []
    for i in range(concurrency):
        tasks.append(asyncio.ensure_future(client_worker(port, path, body, tokens, i, deadline, max_requests,
                                                         replies, timeout)))
        if ramp:
            await asyncio.sleep(ramp / concurrency)
    await asyncio.wait_for(asyncio.gather(*tasks), duration + ramp + timeout + 5)
    return replies


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


def summarise(replies: list[Reply], elapsed: float, expect_events: int | None, stall_gap: float = 2.0) -> dict:
    """rps over 2xx, latency and time-to-first-event percentiles in ms, errors and stalls."""
    good = [r for r in replies if 200 <= r.status < 300 and not r.error]
    short = [r for r in good if expect_events is not None and r.events < expect_events]
    totals, ttfbs = [r.total * 1000 for r in good], [r.ttfb * 1000 for r in good]
    return {"rps": len(good) / elapsed if elapsed else 0.0, "p50": percentile(totals, 50), "p99": percentile(totals, 99),
            "ttfb_p50": percentile(ttfbs, 50), "ttfb_p99": percentile(ttfbs, 99), "ok": len(good),
            "errors": len(replies) - len(good) + len(short),
            "stalled": sum(1 for r in good if r.max_gap > stall_gap) + len(short),
            "max_gap": max((r.max_gap for r in good), default=0.0) * 1000,
            "mean_total": statistics.fmean(totals) if totals else float("nan")}


def run_load(port: int, path: str, body: bytes, tokens: list[str], concurrency: int, duration: float,
             expect_events: int | None = None, max_requests: int = 1_000_000, ramp: float = 0.0) -> dict:
    """Run the asyncio client on a fresh event loop and summarise."""
    started = time.perf_counter()
    replies = asyncio.run(run_clients(port, path, body, tokens, concurrency, duration, max_requests, ramp))
    return summarise(replies, time.perf_counter() - started, expect_events)
