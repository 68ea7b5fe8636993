import asyncio
import orjson, pytest
from .conftest import token

@pytest.mark.gen_test
async def test_chat_json_billed(call, gateway, upstream):
    t = token("alice@example.com")
    r = await call("/openai/v1/chat/completions", "POST", json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}, token=t)
    print(r.code, r.headers, r.body)
    assert r.code == 200
    await asyncio.sleep(0.05)
    u = await call("/usage", token=t)
    print(u.body)

@pytest.mark.gen_test
async def test_chat_stream(call, gateway, upstream):
    t = token("alice@example.com")
    upstream.state.split = 3
    r = await call("/openai/v1/chat/completions", "POST", json={"model": "gpt-4o-mini", "stream": True, "messages": []}, token=t)
    print(r.code, r.headers, r.body.decode())
    await asyncio.sleep(0.05)
    u = await call("/usage", token=t)
    print(u.body)
    print(await gateway.store.ledger())
