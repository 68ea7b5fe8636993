"""Small helpers shared by the gateway tests."""
from __future__ import annotations

import asyncio

import orjson


async def settled(gateway, timeout: float = 5.0) -> None:
    """Wait until every queued charge is committed (bounded in time)."""
    for _ in range(int(timeout / 0.01)):
        if gateway.ledger.pending == 0 and not gateway.ledger._reserves:
            await asyncio.sleep(0.01)  # let a batch in flight finish
            if gateway.ledger.pending == 0:
                return
        await asyncio.sleep(0.01)
    raise AssertionError("charges were not written in time")


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
