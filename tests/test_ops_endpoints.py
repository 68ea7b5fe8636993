"""GET /healthz and GET /metrics, as an operator's monitoring polls them."""
from __future__ import annotations

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from .conftest import token
from .helpers import chat, settled

MINI_IN, MINI_OUT = 0.15e-6, 0.6e-6


def samples(text: bytes) -> dict:
    """{(name, frozenset(labels)): value} of a Prometheus exposition."""
    found = {}
    for family in text_string_to_metric_families(text.decode()):
        for s in family.samples:
            found[(s.name, frozenset(s.labels.items()))] = s.value
    return found


@pytest.mark.gen_test
async def test_healthz_is_ok_without_a_token_while_the_store_answers(call, gateway):
    r = await call("/healthz")
    assert r.code == 200 and orjson.loads(r.body) == {"status": "ok"}
    assert r.headers["Access-Control-Allow-Origin"] == "*"


@pytest.mark.gen_test
async def test_healthz_is_503_while_the_store_does_not_answer(call, gateway):
    await gateway.store.close()  # the store goes away under the running server
    gateway._health = (float("-inf"), None)
    r = await call("/healthz")
    assert r.code == 503 and orjson.loads(r.body) == {"status": "unavailable", "reason": "usage store unavailable"}


@pytest.mark.gen_test
async def test_metrics_count_requests_cost_tokens_and_refusals_without_emails_or_tokens(call, gateway, upstream):
    t = token("metered@example.com")
    for _ in range(3):
        assert (await call("/openai/v1/chat/completions", "POST", json=chat(), token=t)).code == 200
    assert (await call("/openai/v1/chat/completions", "POST", json=chat(stream=True), token=t)).code == 200
    assert (await call("/openai/v1/chat/completions", "POST", json=chat(), token=token("blocked@example.com"))).code == 429
    await call("/healthz")
    await settled(gateway)
    r = await call("/metrics")
    assert r.code == 200 and r.headers["Content-Type"].startswith("text/plain")
    found = samples(r.body)
    assert found[("aipipe_requests_total", frozenset({"provider": "openai", "route": "provider", "status": "200"}.items()))] == 4
    assert found[("aipipe_requests_total", frozenset({"provider": "openai", "route": "provider", "status": "429"}.items()))] == 1
    assert found[("aipipe_requests_total", frozenset({"provider": "", "route": "health", "status": "200"}.items()))] == 1
    assert found[("aipipe_cost_usd_total", frozenset({"provider": "openai"}.items()))] == pytest.approx(
        4 * (12 * MINI_IN + 7 * MINI_OUT), abs=1e-12)
    assert found[("aipipe_tokens_total", frozenset({"provider": "openai", "kind": "input"}.items()))] == 48
    assert found[("aipipe_tokens_total", frozenset({"provider": "openai", "kind": "output"}.items()))] == 28
    assert found[("aipipe_refusals_total", frozenset({"reason": "budget"}.items()))] == 1
    assert found[("aipipe_open_streams", frozenset({"provider": "openai"}.items()))] == 0
    assert found[("aipipe_upstream_ttfb_seconds_count", frozenset({"provider": "openai"}.items()))] == 4
    assert ("process_resident_memory_bytes", frozenset()) in found
    text = r.body.decode()
    assert "example.com" not in text and t not in text and "sk-" not in text


@pytest.mark.gen_test
async def test_metrics_token_when_set_is_required(call, make_gateway, serve):
    gw = await make_gateway(server={"metrics_token": "scrape-secret"})
    url = serve(gw)
    assert (await call(url + "/metrics")).code == 401
    assert (await call(url + "/metrics", headers={"Authorization": "Bearer wrong"})).code == 401
    r = await call(url + "/metrics", headers={"Authorization": "Bearer scrape-secret"})
    assert r.code == 200 and b"aipipe_requests_total" in r.body


@pytest.mark.gen_test(timeout=120)
async def test_one_scrape_shows_every_worker_of_a_multiprocess_server(tmp_path, upstream):
    import asyncio
    import os
    import signal
    import tempfile

    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector
    from tornado.httpclient import AsyncHTTPClient

    from .conftest import base_config
    from .server_process import ServerProcess

    data = base_config(upstream.url, f"sqlite:///{tmp_path}/aipipe.db")
    data["server"] = {"processes": 2}
    proc = ServerProcess(str(tmp_path), data)
    proc.start()
    try:
        await proc.ready()
        client = AsyncHTTPClient(force_instance=True)
        t = token("many@example.com")
        calls = 12
        for _ in range(calls):  # new connections, so the kernel spreads them over both workers
            r = await client.fetch(proc.url + "/openai/v1/chat/completions", method="POST", body=orjson.dumps(chat()),
                                   headers={"Authorization": f"Bearer {t}", "Content-Type": "application/json",
                                            "Connection": "close"}, raise_error=False)
            assert r.code == 200
        client.close()
        labels = {"provider": "openai", "route": "provider", "status": "200"}
        # each worker adds its counts to the shared files once a second: wait (bounded) until they are all in,
        # reading the files rather than scraping, as a scrape adds in the counts of the worker answering it
        folder = os.path.join(tempfile.gettempdir(), f"aipipe-metrics-{proc.proc.pid}")
        for _ in range(150):
            if os.path.isdir(folder):
                files = CollectorRegistry()
                MultiProcessCollector(files, path=folder)
                if files.get_sample_value("aipipe_requests_total", labels) == calls:
                    break
            await asyncio.sleep(0.1)
        counts = []
        for _ in range(4):  # whichever worker answers, the sum is the same
            r = await AsyncHTTPClient(force_instance=True).fetch(proc.url + "/metrics", headers={"Connection": "close"})
            counts.append(samples(r.body)[("aipipe_requests_total", frozenset(labels.items()))])
        assert counts == [calls] * 4
        proc.signal(signal.SIGTERM)
        assert await proc.exited() == 0
    finally:
        proc.kill()
