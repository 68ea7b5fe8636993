"""/usage and /admin/* as users and admins call them."""
from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone

import jwt
import orjson
import pytest

from .conftest import SECRET, token
from .helpers import chat, message, settled

pytestmark = pytest.mark.every_gateway  # over each store and admission (conftest.GATEWAY_MODES)

TODAY = datetime.now(timezone.utc).date()
ADMIN = token("admin@example.com")


def day(n: int) -> str:
    return (TODAY - timedelta(days=n)).isoformat()


@pytest.mark.gen_test
async def test_usage_window_is_exactly_n_utc_dates(call, gateway, upstream):
    for n, cost in ((0, 0.01), (6, 0.02), (7, 0.04)):  # day 7 is outside a 7-day window
        await gateway.store.set_cost("win@example.com", TODAY - timedelta(days=n), cost, time.time())
    r = await call("/usage", token=token("win@example.com"))
    body = orjson.loads(r.body)
    assert body["email"] == "win@example.com" and body["days"] == 7 and body["limit"] == 1.0
    assert [u["date"] for u in body["usage"]] == [day(n) for n in range(6, -1, -1)]  # oldest first
    assert body["cost"] == pytest.approx(0.03, abs=1e-12)
    assert body["spent"] == pytest.approx(0.03, abs=1e-12)
    assert body["remaining"] == pytest.approx(0.97, abs=1e-12)


@pytest.mark.gen_test
async def test_usage_days_shows_longer_history(call, gateway, upstream):
    await gateway.store.set_cost("hist@example.com", TODAY - timedelta(days=20), 0.5, time.time())
    body = orjson.loads((await call("/usage?days=30", token=token("hist@example.com"))).body)
    assert body["days"] == 30 and len(body["usage"]) == 30 and body["cost"] == pytest.approx(0.5)
    assert body["spent"] == 0  # outside the 7-day budget window


@pytest.mark.gen_test
@pytest.mark.parametrize("days", ["0", "367", "abc", "-1"])
async def test_usage_days_out_of_range_is_400(call, gateway, upstream, days):
    r = await call(f"/usage?days={days}", token=token("a@example.com"))
    assert r.code == 400 and "days" in message(r)


@pytest.mark.gen_test
async def test_usage_reflects_a_finished_request_at_once(call, gateway, upstream):
    t = token("fresh@example.com")
    await call("/openai/v1/chat/completions", "POST", json=chat(), token=t)
    await settled(gateway)
    body = orjson.loads((await call("/usage?by=model", token=t)).body)
    assert body["usage"][-1]["cost"] == pytest.approx(6e-6, abs=1e-12)
    assert body["models"] == [{"provider": "openai", "model": "gpt-4o-mini", "requests": 1, "input_tokens": 12,
                               "output_tokens": 7, "cost": pytest.approx(6e-6, abs=1e-12)}]


@pytest.mark.gen_test
async def test_usage_of_another_email_is_for_admins_only(call, gateway, upstream):
    await gateway.store.set_cost("target@example.com", TODAY, 0.2, time.time())
    r = await call("/usage?email=target@example.com", token=token("nosy@example.com"))
    assert r.code == 403 and message(r) == "Admin access required"
    r = await call("/usage?email=target@example.com", token=ADMIN)
    assert r.code == 200 and orjson.loads(r.body)["cost"] == pytest.approx(0.2)


@pytest.mark.gen_test
async def test_native_keys_are_refused_at_usage_and_admin(call, gateway, upstream):
    for path in ("/usage", "/admin/usage"):
        r = await call(path, headers={"Authorization": "Bearer sk-user-native-key"})
        assert r.code == 401, path


@pytest.mark.gen_test
async def test_calendar_month_budget_reports_reset(call, gateway, upstream):
    body = orjson.loads((await call("/usage", token=token("monthly@example.com"))).body)
    assert body["window"]["period"] == "month"
    assert body["window"]["start"] == TODAY.replace(day=1).isoformat()
    assert body["window"]["resets"].endswith("-01T00:00:00Z")


@pytest.mark.gen_test
async def test_non_admin_gets_403_on_every_admin_action(call, gateway, upstream):
    t = token("student@example.com")
    for method, path in (("GET", "/admin/usage"), ("GET", "/admin/token?email=x@y.z"), ("POST", "/admin/cost"), ("GET", "/admin/nope")):
        r = await call(path, method, token=t, body=b"{}" if method == "POST" else None)
        assert r.code == 403 and message(r) == "Admin access required", path


@pytest.mark.gen_test
async def test_admins_from_environment_are_admins(call, gateway, upstream):
    r = await call("/admin/usage", token=token("boss@example.com"))  # from ADMIN_EMAILS in the test env
    assert r.code == 200


@pytest.mark.gen_test
async def test_admin_usage_lists_newest_first_with_filters_and_paging(call, gateway, upstream):
    for email, n, cost in (("a@x.com", 0, 0.1), ("b@x.com", 1, 0.2), ("a@x.com", 2, 0.3)):
        await gateway.store.set_cost(email, TODAY - timedelta(days=n), cost, time.time())
    data = orjson.loads((await call("/admin/usage", token=ADMIN)).body)["data"]
    assert [(d["email"], d["date"], d["cost"]) for d in data] == [("a@x.com", day(0), 0.1), ("b@x.com", day(1), 0.2),
                                                                    ("a@x.com", day(2), 0.3)]
    data = orjson.loads((await call("/admin/usage?email=a@x.com", token=ADMIN)).body)["data"]
    assert [d["cost"] for d in data] == [0.1, 0.3]
    data = orjson.loads((await call(f"/admin/usage?from={day(1)}&to={day(1)}", token=ADMIN)).body)["data"]
    assert [d["email"] for d in data] == ["b@x.com"]
    data = orjson.loads((await call("/admin/usage?limit=1&offset=1", token=ADMIN)).body)["data"]
    assert [d["email"] for d in data] == ["b@x.com"]


@pytest.mark.gen_test
async def test_admin_token_carries_salt_and_works(call, gateway, upstream):
    r = await call("/admin/token?email=salted@example.com", token=ADMIN)
    minted = orjson.loads(r.body)["token"]
    assert jwt.decode(minted, SECRET, algorithms=["HS256"]) == {"email": "salted@example.com", "salt": "pepper-1"}
    assert (await call("/usage", token=minted)).code == 200


@pytest.mark.gen_test
async def test_admin_sets_a_days_cost_and_budget_sees_it_at_once(call, gateway, upstream):
    r = await call("/admin/cost", "POST", token=ADMIN, json={"email": "set@example.com", "date": TODAY.isoformat(), "cost": 1.5})
    assert r.code == 200 and message(r) == f"Cost for set@example.com on {TODAY.isoformat()} set to 1.5"
    r = await call("/openai/v1/chat/completions", "POST", json=chat(), token=token("set@example.com"))
    assert r.code == 429 and message(r) == "Usage $1.5 / $1 in 7 days"
    r = await call("/admin/cost", "POST", token=ADMIN, json={"email": "set@example.com", "date": TODAY.isoformat(), "cost": 0})
    assert r.code == 200
    r = await call("/openai/v1/chat/completions", "POST", json=chat(), token=token("set@example.com"))
    assert r.code == 200
    await settled(gateway)
    ledger = await gateway.store.ledger("set@example.com")
    assert [row["kind"] for row in ledger] == ["request", "adjust", "adjust"]
    total = sum(row["cost"] for row in ledger)
    assert total == pytest.approx(await gateway.store.spend("set@example.com", TODAY), abs=1e-12)


@pytest.mark.gen_test
@pytest.mark.parametrize("body,needle", [
    ({"date": "2025-01-01", "cost": 1}, "email"),
    ({"email": "a@b.c", "cost": 1}, "date"),
    ({"email": "a@b.c", "date": "2025-01-01"}, "cost"),
    ({"email": "a@b.c", "date": "2025-13-01", "cost": 1}, "date"),
    ({"email": "a@b.c", "date": "yesterday", "cost": 1}, "date"),
    ({"email": "a@b.c", "date": "2025-01-01", "cost": -1}, "cost"),
    ({"email": "a@b.c", "date": "2025-01-01", "cost": "lots"}, "cost"),
    ({"email": "not-an-email", "date": "2025-01-01", "cost": 1}, "email"),
])
async def test_admin_cost_rejects_bad_input_naming_the_field(call, gateway, upstream, body, needle):
    r = await call("/admin/cost", "POST", token=ADMIN, json=body)
    assert r.code == 400 and needle in message(r)


@pytest.mark.gen_test
async def test_admin_cost_needs_post_and_unknown_actions_are_404(call, gateway, upstream):
    r = await call("/admin/cost", token=ADMIN)
    assert r.code == 405 and message(r) == "Use POST /admin/cost"
    r = await call("/admin/cost", "POST", token=ADMIN, body=b"not json")
    assert r.code == 400 and message(r) == "Request body is not valid JSON"
    r = await call("/admin/frobnicate", token=ADMIN)
    assert r.code == 404 and message(r) == "Unknown admin action"


@pytest.mark.gen_test
@pytest.mark.parametrize("cost", [1.7e308, 1e6 + 0.01, 1e300])
async def test_admin_cost_above_a_million_usd_is_400(call, gateway, upstream, cost):
    r = await call("/admin/cost", "POST", token=ADMIN, json={"email": "big@example.com", "date": TODAY.isoformat(), "cost": cost})
    assert r.code == 400 and message(r) == "cost must be at most 1,000,000 USD"
    assert r.headers["Access-Control-Allow-Origin"] == "*"
    assert await gateway.store.daily_usage("big@example.com", TODAY) == []


@pytest.mark.gen_test
@pytest.mark.parametrize("raw", [b"1e400", b"-1e400", b"NaN", b"Infinity", b"true", b"null", b"[1]", b'"1"'])
async def test_admin_cost_that_is_not_a_finite_number_is_400(call, gateway, upstream, raw):
    body = b'{"email": "big@example.com", "date": "' + TODAY.isoformat().encode() + b'", "cost": ' + raw + b"}"
    r = await call("/admin/cost", "POST", token=ADMIN, body=body, headers={"Content-Type": "application/json"})
    assert r.code == 400 and orjson.loads(r.body)["message"] in ("cost must be a number of USD", "Request body is not valid JSON")


@pytest.mark.gen_test
async def test_admin_cost_of_a_million_twice_sums_in_usage(call, gateway, upstream):
    for n in (0, 1):
        r = await call("/admin/cost", "POST", token=ADMIN, json={"email": "big@example.com", "date": day(n), "cost": 1e6})
        assert r.code == 200
    body = orjson.loads((await call("/usage", token=token("big@example.com"))).body)
    assert body["spent"] == body["cost"] == 2e6 and body["remaining"] == 0


@pytest.mark.gen_test
async def test_usage_never_sums_to_inf_or_null_even_from_huge_stored_costs(call, gateway, upstream, store_kind):
    for n in (0, 1, 2):  # what the store may hold from before costs were bounded
        await gateway.store.set_cost("huge@example.com", TODAY - timedelta(days=n), 1.7e308, time.time())
    r = await call("/usage?by=model", token=token("huge@example.com"))
    assert r.code == 200
    body = orjson.loads(r.body)
    for value in (body["spent"], body["cost"], body["held"], body["remaining"], *(u["cost"] for u in body["usage"])):
        assert isinstance(value, float) and value == value and value != float("inf")
    assert body["spent"] >= 1.7e308 and body["remaining"] == 0
    r = await call("/admin/usage?email=huge@example.com", token=ADMIN)
    assert r.code == 200 and all(isinstance(row["cost"], float) for row in orjson.loads(r.body)["data"])
    r = await call("/openai/v1/chat/completions", "POST", json=chat(), token=token("huge@example.com"))
    assert r.code == 429  # still over budget


@pytest.mark.gen_test
@pytest.mark.parametrize("path", ["/admin", "/admin/"])
async def test_admin_page_is_served_with_or_without_trailing_slash(call, gateway, upstream, path):
    r = await call(path)
    assert r.code == 200 and r.headers["Content-Type"].startswith("text/html")
    assert b'src="/static/admin.js"' in r.body
