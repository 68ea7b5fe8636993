"""Tokens, unknown routes, CORS and budgets as a browser app meets them."""
from __future__ import annotations

import base64
import time

import jwt
import orjson
import pytest

from .conftest import SECRET, token
from .fake_upstream import open_gate_once_decided
from .helpers import chat, message, settled

pytestmark = pytest.mark.every_gateway  # over each store and admission (conftest.GATEWAY_MODES)


def b64(obj) -> str:
    return base64.urlsafe_b64encode(orjson.dumps(obj)).rstrip(b"=").decode()


@pytest.mark.gen_test
@pytest.mark.parametrize("header", ["Bearer {t}", "bearer {t}", "BEARER   {t}", "{t}"])
async def test_token_accepted_in_each_authorization_form(call, gateway, upstream, header):
    t = token("forms@example.com")
    r = await call("/usage", headers={"Authorization": header.format(t=t)})
    assert r.code == 200 and orjson.loads(r.body)["email"] == "forms@example.com"


@pytest.mark.gen_test
async def test_token_accepted_in_x_goog_api_key(call, gateway, upstream):
    r = await call("/usage", headers={"x-goog-api-key": token("goog@example.com")})
    assert r.code == 200 and orjson.loads(r.body)["email"] == "goog@example.com"


@pytest.mark.gen_test
async def test_token_minted_like_the_original_keeps_working(call, gateway, upstream):
    # The original signs {"email"} with HS256 via jose: same header and payload shape.
    original = jwt.encode({"email": "old@example.com"}, SECRET, algorithm="HS256", headers={"alg": "HS256"})
    r = await call("/usage", headers={"Authorization": f"Bearer {original}"})
    assert r.code == 200


def forged_tokens() -> dict[str, str]:
    none_alg = f"{b64({'alg': 'none', 'typ': 'JWT'})}.{b64({'email': 'eve@example.com'})}."
    return {
        "wrong secret": jwt.encode({"email": "eve@example.com"}, "another-secret-0123456789", algorithm="HS256"),
        "alg none": none_alg,
        "HS512": jwt.encode({"email": "eve@example.com"}, SECRET, algorithm="HS512"),
        "garbage": "not.a.token",
        "no email": jwt.encode({"sub": "eve"}, SECRET, algorithm="HS256"),
    }


@pytest.mark.gen_test
@pytest.mark.parametrize("kind", list(forged_tokens()))
async def test_bad_tokens_are_401_and_never_echoed(call, gateway, upstream, kind):
    bad = forged_tokens()[kind]
    r = await call("/openai/v1/chat/completions", "POST", json=chat(), headers={"Authorization": f"Bearer {bad}"})
    assert r.code == 401 and message(r).startswith("Bearer token is invalid")
    assert bad.encode() not in r.body
    assert r.headers["Access-Control-Allow-Origin"] == "*"
    assert upstream.state.requests == []


@pytest.mark.gen_test
async def test_expired_token_is_401_and_exp_is_honoured(call, gateway, upstream):
    r = await call("/usage", token=token("x@example.com", expires_in=-10))
    assert r.code == 401 and "expired" in message(r)
    r = await call("/usage", token=token("x@example.com", expires_in=3600))
    assert r.code == 200


@pytest.mark.gen_test
async def test_missing_token_is_401(call, gateway, upstream):
    r = await call("/openai/v1/chat/completions", "POST", json=chat())
    assert r.code == 401 and message(r) == "Missing Authorization: Bearer token"


@pytest.mark.gen_test
async def test_salt_revokes_tokens(call, gateway, upstream):
    r = await call("/usage", token=token("salted@example.com"))
    assert r.code == 401 and message(r) == "Bearer token is no longer valid"
    r = await call("/usage", token=token("salted@example.com", salt="old-salt"))
    assert r.code == 401 and message(r) == "Bearer token is no longer valid"
    r = await call("/usage", token=token("salted@example.com", salt="pepper-1"))
    assert r.code == 200


@pytest.mark.gen_test
@pytest.mark.parametrize("name", ["nosuch", "constructor", "__proto__", "toString"])
async def test_unknown_provider_is_404_before_auth(call, gateway, upstream, name):
    r = await call(f"/{name}/v1/chat/completions", "POST", json=chat())
    assert r.code == 404 and message(r) == f"Unknown provider: {name}"
    assert r.headers["Access-Control-Allow-Origin"] == "*"


@pytest.mark.gen_test
async def test_preflight_on_any_path_needs_no_auth(call, gateway, upstream):
    for path in ("/openai/v1/chat/completions", "/usage", "/admin/cost", "/nosuch/x"):
        r = await call(path, "OPTIONS", headers={"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
                                                 "Access-Control-Request-Headers": "authorization, content-type, x-custom"})
        assert r.code == 200, path
        assert r.headers["Access-Control-Allow-Origin"] == "*"
        assert r.headers["Access-Control-Max-Age"] == "86400"
        assert "x-custom" in r.headers["Access-Control-Allow-Headers"]
        for verb in ("GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"):
            assert verb in r.headers["Access-Control-Allow-Methods"]
    assert upstream.state.requests == []


@pytest.mark.gen_test
async def test_cors_headers_on_success_and_cost_header_exposed(call, gateway, upstream):
    r = await call("/openai/v1/chat/completions", "POST", json=chat(), token=token("cors@example.com"))
    assert r.headers["Access-Control-Allow-Origin"] == "*"
    assert "X-AIPipe-Cost" in r.headers["Access-Control-Expose-Headers"]


@pytest.mark.gen_test
async def test_blocked_user_gets_429_before_anything_goes_upstream(call, gateway, upstream):
    r = await call("/openai/v1/chat/completions", "POST", json=chat(), token=token("blocked@example.com"))
    assert r.code == 429 and message(r) == "Usage $0 / $0 in 1 days"
    assert upstream.state.requests == []


@pytest.mark.gen_test
async def test_user_at_limit_is_refused_with_usage_message(call, gateway, upstream):
    from datetime import date, datetime, timezone
    today = datetime.now(timezone.utc).date()
    await gateway.store.set_cost("spender@example.com", today, 1.25, time.time())
    r = await call("/openai/v1/chat/completions", "POST", json=chat(), token=token("spender@example.com"))
    assert r.code == 429 and message(r) == "Usage $1.25 / $1 in 7 days"
    assert isinstance(today, date) and upstream.state.requests == []


@pytest.mark.gen_test
async def test_domain_budget_applies_to_domain_users(call, gateway, upstream):
    r = await call("/usage", token=token("student@school.edu"))
    body = orjson.loads(r.body)
    assert body["limit"] == 0.5 and body["window"]["days"] == 30 and len(body["usage"]) == 30


@pytest.mark.gen_test
async def test_a_user_just_under_the_limit_may_make_one_more_call(call, gateway, upstream):
    from datetime import datetime, timezone
    await gateway.store.set_cost("edge@example.com", datetime.now(timezone.utc).date(), 0.99, time.time())
    r = await call("/openai/v1/chat/completions", "POST", json=chat(), token=token("edge@example.com"))
    assert r.code == 200
    await settled(gateway)


@pytest.mark.gen_test
async def test_concurrency_cap_answers_429_with_retry_after(make_gateway, serve, call, upstream):
    import asyncio
    url = serve(await make_gateway(limits={"max_concurrent_per_user": 2}))
    t = token("busy@example.com")
    answered = []

    async def one():
        r = await call(url + "/openai/v1/chat/completions", "POST", json=chat(), token=t)
        answered.append(r)
        return r
    upstream.state.gate = asyncio.Event()  # the admitted stay upstream until all four were admitted or refused
    seen = len(upstream.state.requests)
    results, _ = await asyncio.gather(asyncio.gather(*[one() for _ in range(4)]),
                                      open_gate_once_decided(upstream.state, seen + 4, lambda: len(answered)))
    codes = sorted(r.code for r in results)
    assert codes == [200, 200, 429, 429]
    refused = next(r for r in results if r.code == 429)
    assert refused.headers["Retry-After"] == "1" and "in flight" in message(refused)


@pytest.mark.gen_test
async def test_requests_per_minute_limit(make_gateway, serve, call, upstream):
    url = serve(await make_gateway(limits={"rpm_per_user": 3}))
    t = token("rpm@example.com")
    codes = [(await call(url + "/openai/v1/models", token=t)).code for _ in range(4)]
    assert codes == [200, 200, 200, 429]
    r = await call(url + "/openai/v1/models", token=t)
    assert 1 <= int(r.headers["Retry-After"]) <= 60
    assert (await call(url + "/openai/v1/models", token=token("other@example.com"))).code == 200
