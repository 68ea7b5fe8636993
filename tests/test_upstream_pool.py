"""Connections to the provider are kept open and reused, and a connection the provider closed is not."""
from __future__ import annotations

import pytest

from .conftest import token
from .helpers import chat, spent


def peers(upstream) -> list:
    return [r["peer"] for r in upstream.state.requests]


@pytest.mark.gen_test
async def test_sequential_calls_reuse_one_connection(call, gateway, upstream):
    t = token("pool@example.com")
    for body in (chat(), chat(stream=True), chat(), chat(stream=True)):
        r = await call("/openai/v1/chat/completions", "POST", json=body, token=t)
        assert r.code == 200
    assert len(set(peers(upstream))) == 1
    assert await spent(gateway, "pool@example.com") == pytest.approx(4 * (12 * 0.15e-6 + 7 * 0.6e-6), abs=1e-12)


@pytest.mark.gen_test
async def test_connection_closed_by_the_provider_while_idle_is_not_reused(call, gateway, upstream):
    t = token("pool@example.com")
    assert (await call("/openai/v1/chat/completions", "POST", json=chat(), token=t)).code == 200
    await upstream.server.close_all_connections()  # the provider drops its idle keep-alive connections
    r = await call("/openai/v1/chat/completions", "POST", json=chat(), token=t)
    assert r.code == 200
    assert len(set(peers(upstream))) == 2


@pytest.mark.gen_test
async def test_error_answers_and_connection_close_answers_are_handled(call, gateway, upstream):
    t = token("pool@example.com")
    upstream.state.status = 500
    assert (await call("/openai/v1/chat/completions", "POST", json=chat(), token=t)).code == 500
    upstream.state.status = 200
    assert (await call("/openai/v1/chat/completions", "POST", json=chat(), token=t)).code == 200
    assert len(set(peers(upstream))) == 1
