"""The official openai package works unchanged against the gateway."""
from __future__ import annotations

import openai
import pytest

from .conftest import token
from .fake_upstream import REPLY
from .helpers import spent

pytestmark = pytest.mark.every_gateway  # over each store and admission (conftest.GATEWAY_MODES)


@pytest.mark.gen_test
async def test_official_openai_client_streams_and_non_streams(gateway, upstream, base_url, http_server):
    client = openai.AsyncOpenAI(base_url=f"{base_url}/openai/v1", api_key=token("sdk@example.com"), max_retries=0)
    try:
        reply = await client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "Hi"}])
        assert reply.choices[0].message.content == REPLY and reply.usage.total_tokens == 19
        stream = await client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "Hi"}], stream=True)
        pieces = [chunk.choices[0].delta.content or "" async for chunk in stream]  # choices[0] exists in every chunk
        assert sorted("".join(pieces)) == sorted(REPLY)
        with pytest.raises(openai.BadRequestError, match="pricing unknown"):
            await client.chat.completions.create(model="gpt-unknown", messages=[{"role": "user", "content": "Hi"}])
    finally:
        await client.close()
    assert await spent(gateway, "sdk@example.com") == pytest.approx(2 * (12 * 0.15e-6 + 7 * 0.6e-6), abs=1e-12)


@pytest.mark.gen_test
async def test_the_sdk_gives_up_at_once_on_a_budget_refusal_and_rate_limits_say_when_to_retry(
        make_gateway, serve, upstream, call):
    import logging

    gw = await make_gateway(limits={"rpm_per_user": 1})
    url = serve(gw)
    attempts = []

    class Counting(logging.Handler):
        def emit(self, record):
            if "/openai/v1/chat/completions" in record.getMessage():
                attempts.append(record.getMessage().split()[0])

    counter = Counting()
    logging.getLogger("aipipe.access").addHandler(counter)
    try:
        broke = openai.AsyncOpenAI(base_url=f"{url}/openai/v1", api_key=token("blocked@example.com"), max_retries=2)
        with pytest.raises(openai.RateLimitError, match="Usage"):
            await broke.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "Hi"}])
        await broke.close()
    finally:
        logging.getLogger("aipipe.access").removeHandler(counter)
    assert attempts == ["429"]  # x-should-retry: false, so one request and no retries
    t = token("rpm@example.com")
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hi"}]}
    assert (await call(url + "/openai/v1/chat/completions", "POST", json=body, token=t)).code == 200
    limited = await call(url + "/openai/v1/chat/completions", "POST", json=body, token=t)
    assert limited.code == 429 and 1 <= int(limited.headers["Retry-After"]) <= 60
    assert "x-should-retry" not in limited.headers  # a rate limit passes: the SDK may wait and try again
