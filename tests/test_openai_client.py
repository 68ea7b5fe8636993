"""The official openai package works unchanged against the gateway."""
from __future__ import annotations

import openai
import pytest

from .conftest import token
from .fake_upstream import REPLY
from .helpers import spent


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
