"""Budgets set at runtime (/admin/budget), the audit trail (/admin/audit) and the users table (/admin/users), over
HTTP on SQLite and on PostgreSQL: what admins see, what each mistake answers, and that a rule applies to the next
call everywhere: in this process, and through another server sharing the database."""
from __future__ import annotations

import asyncio
import time
from datetime import datetime, timezone

import orjson
import pytest
from tornado.httpclient import AsyncHTTPClient, HTTPRequest

from aipipe.config import Budget, build_config
from aipipe.rules import BudgetRules
from aipipe.storage import open_store

from .conftest import ENV, base_config, token
from .helpers import chat, message, settled

TODAY = datetime.now(timezone.utc).date()
ADMIN, ROOT = "admin@example.com", "root@example.com"  # from the config file, and from ADMIN_EMAILS
CHAT = "/openai/v1/chat/completions"


def body(response) -> dict:
    return orjson.loads(response.body)


async def spend(call, email: str, cost: float) -> None:
    """Set today's spend of email through the admin API."""
    r = await call("/admin/cost", "POST", token=token(ADMIN), json={"email": email, "date": TODAY.isoformat(), "cost": cost})
    assert r.code == 200, r.body


# --- GET, POST, DELETE /admin/budget -------------------------------------------------------------------

@pytest.mark.gen_test
async def test_budget_lists_the_config_files_rules_with_their_source(call, gateway, upstream):
    r = await call("/admin/budget", token=token(ADMIN))
    assert r.code == 200
    rules = body(r)["rules"]
    assert [x["match"] for x in rules][:2] == ["*", "@school.edu"]  # "*", domains, then emails
    star = rules[0]
    assert star == {"match": "*", "limit": 1.0, "days": 7, "period": None, "models": [], "source": "config"}
    assert {x["match"]: x["period"] for x in rules}["monthly@example.com"] == "month"
    assert {x["source"] for x in rules} == {"config"}


@pytest.mark.gen_test
async def test_a_rule_set_at_runtime_refuses_the_users_next_call_without_a_restart(call, gateway, upstream):
    user = "learner@example.com"
    await spend(call, user, 0.5)
    assert (await call(CHAT, "POST", json=chat(), token=token(user))).code == 200  # $0.5 of the file's $1
    r = await call("/admin/budget", "POST", token=token(ADMIN), json={"match": user, "limit": 0.25, "days": 7})
    assert r.code == 200 and message(r) == f"Budget for {user} set to $0.25 in 7 days"
    assert body(r)["rule"] == {"match": user, "limit": 0.25, "days": 7, "period": None, "models": [],
                               "source": "database", "updated": pytest.approx(time.time(), abs=60),
                               "updated_by": ADMIN, "overrides": None}
    r = await call(CHAT, "POST", json=chat(), token=token(user))
    assert r.code == 429 and message(r) == "Usage $0.500006 / $0.25 in 7 days"
    assert r.headers["x-should-retry"] == "false"
    usage = body(await call("/usage", token=token(user)))
    assert usage["limit"] == 0.25 and usage["remaining"] == 0

    r = await call(f"/admin/budget?match={user}", "DELETE", token=token(ADMIN))
    assert r.code == 200 and message(r) == f"Budget rule for {user} removed"
    assert (await call(CHAT, "POST", json=chat(), token=token(user))).code == 200  # "*" again
    assert body(await call("/usage", token=token(user)))["limit"] == 1.0


@pytest.mark.gen_test
async def test_a_database_rule_overrides_the_files_rule_for_the_same_match_until_removed(call, gateway, upstream):
    r = await call("/admin/budget", "POST", token=token(ROOT),
                   json={"match": "@School.edu", "limit": 2.0, "period": "week", "models": ["gpt-4o-mini"]})
    assert r.code == 200 and message(r) == "Budget for @school.edu set to $2 this week"
    rule = body(r)["rule"]
    assert rule["source"] == "database" and rule["overrides"] == {"limit": 0.5, "days": 30, "period": None, "models": []}
    assert rule["updated_by"] == ROOT and rule["models"] == ["gpt-4o-mini"]
    usage = body(await call("/usage", token=token("kid@school.edu")))
    assert usage["limit"] == 2.0 and usage["window"]["period"] == "week" and usage["allowed_models"] == ["gpt-4o-mini"]
    listed = {x["match"]: x for x in body(await call("/admin/budget", token=token(ADMIN)))["rules"]}
    assert listed["@school.edu"]["source"] == "database" and listed["*"]["source"] == "config"

    r = await call("/admin/budget?match=@school.edu", "DELETE", token=token(ADMIN))
    assert r.code == 200 and message(r) == "Budget rule for @school.edu removed; the config file's rule applies again"
    assert body(await call("/usage", token=token("kid@school.edu")))["limit"] == 0.5
    r = await call("/admin/budget?match=@school.edu", "DELETE", token=token(ADMIN))
    assert r.code == 404 and message(r) == (
        "No budget rule for @school.edu was set here: it is in the config file, change it there")
    r = await call("/admin/budget?match=nobody@example.com", "DELETE", token=token(ADMIN))
    assert r.code == 404 and message(r) == "No budget rule for nobody@example.com was set here"


@pytest.mark.gen_test
async def test_a_star_rule_applies_to_everyone_without_a_rule_of_their_own(call, gateway, upstream):
    await spend(call, "someone@example.com", 0.2)
    r = await call("/admin/budget", "POST", token=token(ADMIN), json={"match": "*", "limit": 0.1, "days": 1})
    assert r.code == 200
    r = await call(CHAT, "POST", json=chat(), token=token("someone@example.com"))
    assert r.code == 429 and message(r) == "Usage $0.2 / $0.1 in 1 days"
    assert body(await call("/usage", token=token("kid@school.edu")))["limit"] == 0.5  # a domain rule is nearer


BAD_RULES = [
    ({"limit": 1}, "Missing field: match"),
    ({"match": "a@b.c"}, "Missing field: limit"),
    ({"match": "not-an-email", "limit": 1}, 'match must be an email address, "@domain" or "*"'),
    ({"match": "@", "limit": 1}, 'match must be an email address, "@domain" or "*"'),
    ({"match": "a@b@c", "limit": 1}, 'match must be an email address, "@domain" or "*"'),
    ({"match": "**", "limit": 1}, 'match must be an email address, "@domain" or "*"'),
    ({"match": "a b@c.d", "limit": 1}, 'match must be an email address, "@domain" or "*"'),
    ({"match": "a@b.c\n", "limit": 1}, None),  # stripped, then fine
    ({"match": "a@b.c\u0000x", "limit": 1}, 'match must be an email address, "@domain" or "*"'),
    ({"match": 7, "limit": 1}, 'match must be an email address, "@domain" or "*"'),
    ({"match": "x" * 400 + "@b.c", "limit": 1}, 'match must be an email address, "@domain" or "*"'),
    ({"match": "a@b.c", "limit": -1}, "limit must not be negative"),
    ({"match": "a@b.c", "limit": -0.000001}, "limit must not be negative"),
    ({"match": "a@b.c", "limit": "5"}, "limit must be a number of USD"),
    ({"match": "a@b.c", "limit": True}, "limit must be a number of USD"),
    ({"match": "a@b.c", "limit": None}, "limit must be a number of USD"),
    ({"match": "a@b.c", "limit": 1e6 + 0.01}, "limit must be at most 1,000,000 USD"),
    ({"match": "a@b.c", "limit": 1.7e308}, "limit must be at most 1,000,000 USD"),
    ({"match": "a@b.c", "limit": 1, "days": 0}, "days must be a whole number from 1 to 366"),
    ({"match": "a@b.c", "limit": 1, "days": 367}, "days must be a whole number from 1 to 366"),
    ({"match": "a@b.c", "limit": 1, "days": 7.5}, "days must be a whole number from 1 to 366"),
    ({"match": "a@b.c", "limit": 1, "days": "7"}, "days must be a whole number from 1 to 366"),
    ({"match": "a@b.c", "limit": 1, "days": True}, "days must be a whole number from 1 to 366"),
    ({"match": "a@b.c", "limit": 1, "period": "year"}, 'period must be one of "day", "week", "month"'),
    ({"match": "a@b.c", "limit": 1, "period": "Week"}, 'period must be one of "day", "week", "month"'),
    ({"match": "a@b.c", "limit": 1, "days": 7, "period": "week"}, "Give days or period, not both"),
    ({"match": "a@b.c", "limit": 1, "models": "gpt-4o"}, "models must be a list of model patterns"),
    ({"match": "a@b.c", "limit": 1, "models": ["gpt-4o", ""]}, "models must be a list of model patterns"),
    ({"match": "a@b.c", "limit": 1, "models": ["  "]}, "models must be a list of model patterns"),
    ({"match": "a@b.c", "limit": 1, "models": [3]}, "models must be a list of model patterns"),
    ({"match": "a@b.c", "limit": 1, "models": {"a": 1}}, "models must be a list of model patterns"),
    ({"match": "a@b.c", "limit": 1, "models": ["m"] * 101}, "models must be at most 100 patterns"),
    ({"match": "a@b.c", "limit": 1, "models": ["m" * 257]}, "models must be at most 100 patterns"),
    ({"match": "a@b.c", "limit": 1, "model": ["m"]}, "model is not a budget key (use match, limit, days, period, models)"),
    ({"match": "a@b.c", "limit": 1, "user": "x"}, "user is not a budget key (use match, limit, days, period, models)"),
]


@pytest.mark.gen_test
@pytest.mark.parametrize("rule,said", BAD_RULES)
async def test_a_bad_rule_is_400_with_the_reason_and_changes_nothing(call, gateway, upstream, rule, said):
    r = await call("/admin/budget", "POST", token=token(ADMIN), json=rule)
    if said is None:
        assert r.code == 200
        return
    assert r.code == 400 and message(r).startswith(said), message(r)
    assert r.headers["Access-Control-Allow-Origin"] == "*" and r.headers["Content-Type"] == "application/json"
    assert {x["source"] for x in body(await call("/admin/budget", token=token(ADMIN)))["rules"]} == {"config"}
    assert await gateway.store.audit() == []


@pytest.mark.gen_test
@pytest.mark.parametrize("raw,said", [
    (b'{"match": "a@b.c", "limit": NaN}', "Request body is not valid JSON"),
    (b'{"match": "a@b.c", "limit": Infinity}', "Request body is not valid JSON"),
    (b'{"match": "a@b.c", "limit": 1e400}', None),
    (b'{"match": "a@b.c", "limit": -1e400}', None),
    (b"not json", "Request body is not valid JSON"),
    (b'[{"match": "a@b.c", "limit": 1}]', "Request body must be a JSON object"),
    (b"", "Request body is not valid JSON"),
])
async def test_a_limit_that_is_not_a_finite_number_or_a_body_that_is_not_an_object_is_400(call, gateway, upstream,
                                                                                       raw, said):
    r = await call("/admin/budget", "POST", token=token(ADMIN), body=raw, headers={"Content-Type": "application/json"})
    assert r.code == 400
    if said:
        assert message(r) == said
    else:  # orjson reads 1e400 as infinity, or refuses it: either way no rule
        assert message(r) in ("limit must be a number of USD", "limit must not be negative",
                              "limit must be at most 1,000,000 USD", "Request body is not valid JSON")


@pytest.mark.gen_test
@pytest.mark.parametrize("query,status,said", [
    ("", 400, "Missing argument: match"),
    ("?match=", 400, 'match must be an email address, "@domain" or "*"'),
    ("?match=nope", 400, 'match must be an email address, "@domain" or "*"'),
    ("?match=%40", 400, 'match must be an email address, "@domain" or "*"'),
    ("?match=*", 404, "No budget rule for * was set here: it is in the config file, change it there"),
])
async def test_delete_needs_a_valid_match(call, gateway, upstream, query, status, said):
    r = await call("/admin/budget" + query, "DELETE", token=token(ADMIN))
    assert (r.code, message(r)) == (status, said)


@pytest.mark.gen_test
@pytest.mark.parametrize("method,path,said", [
    ("PUT", "/admin/budget", "Use GET, POST or DELETE /admin/budget"),
    ("PATCH", "/admin/budget", "Use GET, POST or DELETE /admin/budget"),
    ("POST", "/admin/audit", "Use GET /admin/audit"),
    ("DELETE", "/admin/users", "Use GET /admin/users"),
    ("GET", "/admin/cost", "Use POST /admin/cost"),
    ("POST", "/admin/token", "Use GET /admin/token"),
])
async def test_the_wrong_method_is_405_naming_the_right_ones(call, gateway, upstream, method, path, said):
    r = await call(path, method, token=token(ADMIN), body=b"{}" if method in ("POST", "PUT", "PATCH") else None)
    assert (r.code, message(r)) == (405, said)


ENDPOINTS = [("GET", "/admin/budget"), ("POST", "/admin/budget"), ("DELETE", "/admin/budget?match=*"),
             ("GET", "/admin/audit"), ("GET", "/admin/users")]


@pytest.mark.gen_test
@pytest.mark.parametrize("method,path", ENDPOINTS)
async def test_non_admins_get_403_and_missing_tokens_401_on_every_new_endpoint(call, gateway, upstream, method, path):
    payload = b'{"match": "*", "limit": 100}' if method == "POST" else None
    r = await call(path, method, token=token("student@example.com"), body=payload)
    assert (r.code, message(r)) == (403, "Admin access required")
    r = await call(path, method, body=payload)
    assert (r.code, message(r)) == (401, "Missing Authorization: Bearer token")
    r = await call(path, method, body=payload, headers={"Authorization": "Bearer sk-native-provider-key"})
    assert r.code == 401
    r = await call(path, method, body=payload, token=token(ADMIN, secret="another-secret-0123456789abcdef-x"))
    assert r.code == 401
    assert {x["source"] for x in body(await call("/admin/budget", token=token(ADMIN)))["rules"]} == {"config"}


# --- the audit trail --------------------------------------------------------------------------------------

@pytest.mark.gen_test
async def test_every_admin_change_is_in_the_audit_trail_newest_first(call, gateway, upstream):
    await spend(call, "graded@example.com", 0.42)
    assert (await call("/admin/budget", "POST", token=token(ROOT), json={"match": "@x.com", "limit": 3, "days": 2})).code == 200
    assert (await call("/admin/budget?match=@x.com", "DELETE", token=token(ADMIN))).code == 200
    minted = body(await call("/admin/token?email=Student@Example.com", token=token(ROOT)))["token"]
    assert (await call("/admin/budget", "POST", token=token(ADMIN), json={"match": "bad"})).code == 400  # no change
    r = await call("/admin/audit", token=token(ADMIN))
    assert r.code == 200
    rows = body(r)["data"]
    assert [(a["admin"], a["action"], a["target"]) for a in rows] == [
        (ROOT, "token.mint", "student@example.com"),
        (ADMIN, "budget.remove", "@x.com"),
        (ROOT, "budget.set", "@x.com"),
        (ADMIN, "cost.set", "graded@example.com"),
    ]
    assert rows[3]["detail"] == {"date": TODAY.isoformat(), "cost": 0.42}
    assert rows[2]["detail"] == {"limit": 3.0, "days": 2, "period": None, "models": [], "previous": None}
    assert rows[1]["detail"] == {"removed": {"limit": 3.0, "days": 2, "period": None, "models": []}}
    assert rows[0]["detail"] == {} and minted not in r.body.decode()  # who minted for whom, never the token
    assert all(abs(a["ts"] - time.time()) < 60 for a in rows)
    paged = body(await call("/admin/audit?limit=2&offset=1", token=token(ADMIN)))["data"]
    assert [a["action"] for a in paged] == ["budget.remove", "budget.set"]
    for bad in ("limit=0", "limit=1001", "offset=-1", "limit=x"):
        r = await call(f"/admin/audit?{bad}", token=token(ADMIN))
        assert r.code == 400 and bad.split("=")[0] in message(r)


@pytest.mark.gen_test
async def test_a_token_is_not_minted_when_the_audit_cannot_be_written(call, gateway, upstream):
    await gateway.store.close()  # the store is gone: an unrecorded mint would be an untraceable credential
    r = await call("/admin/token?email=x@example.com", token=token(ADMIN))
    assert (r.code, message(r)) == (503, "Usage store unavailable, try again shortly")
    assert b"token" not in r.body.replace(b"Usage store", b"")


# --- the users table ---------------------------------------------------------------------------------------

@pytest.mark.gen_test
async def test_users_lists_spend_limit_requests_and_last_call_in_each_users_window(call, gateway, upstream):
    for email in ("u1@example.com", "u2@school.edu", "u2@school.edu"):
        assert (await call(CHAT, "POST", json=chat(), token=token(email))).code == 200
    await spend(call, "u3@example.com", 0.75)
    r = await call("/admin/users", token=token(ADMIN))
    assert r.code == 200
    found = body(r)
    assert found["total"] == 3 and found["limit"] == 50 and found["offset"] == 0
    rows = {u["email"]: u for u in found["data"]}
    assert [u["email"] for u in found["data"]][0] == "u3@example.com"  # most spent first
    u3 = rows["u3@example.com"]
    assert (u3["limit"], u3["requests"], u3["last_call"]) == (1.0, 0, None)
    assert u3["spent"] == pytest.approx(0.75, abs=1e-9) and u3["remaining"] == pytest.approx(0.25, abs=1e-9)
    assert u3["share"] == pytest.approx(0.75, abs=1e-9)
    u2 = rows["u2@school.edu"]
    assert u2["limit"] == 0.5 and u2["requests"] == 2 and u2["spent"] == pytest.approx(12e-6, abs=1e-9)
    assert abs(u2["last_call"] - time.time()) < 60
    r = await call("/admin/users?sort=email&order=asc&q=EXAMPLE&limit=1&offset=1", token=token(ADMIN))
    assert [u["email"] for u in body(r)["data"]] == ["u3@example.com"] and body(r)["total"] == 2


@pytest.mark.gen_test
async def test_users_follow_a_rule_set_at_runtime(call, gateway, upstream):
    await spend(call, "cap@example.com", 0.3)
    await call("/admin/budget", "POST", token=token(ADMIN), json={"match": "cap@example.com", "limit": 0.6, "days": 1})
    (row,) = body(await call("/admin/users?q=cap@", token=token(ADMIN)))["data"]
    assert row["limit"] == 0.6 and row["share"] == pytest.approx(0.5, abs=1e-9)


@pytest.mark.gen_test
@pytest.mark.parametrize("query,said", [
    ("sort=cost", "sort must be one of email, spent, limit, remaining, share, requests, last_call"),
    ("order=up", "order must be one of asc, desc"),
    ("limit=0", "limit must be a whole number from 1 to 1000"),
    ("limit=5000", "limit must be a whole number from 1 to 1000"),
    ("offset=-3", "offset must be a whole number from 0 to 1000000000"),
])
async def test_users_arguments_are_checked(call, gateway, upstream, query, said):
    r = await call(f"/admin/users?{query}", token=token(ADMIN))
    assert (r.code, message(r)) == (400, said)


# --- /usage?by=model reconciles with spent -------------------------------------------------------------------

@pytest.mark.gen_test
async def test_by_model_rows_add_up_to_spent_with_adjustments_as_their_own_row(call, gateway, upstream):
    user = "recon@example.com"
    for _ in range(2):
        assert (await call(CHAT, "POST", json=chat(), token=token(user))).code == 200
    await settled(gateway)
    await spend(call, user, 0.25)  # replaces today's total: the difference is an adjustment
    u = body(await call("/usage?by=model", token=token(user)))
    assert [(m["provider"], m["model"], m["requests"]) for m in u["models"]] == [
        ("admin", "adjustment", 0), ("openai", "gpt-4o-mini", 2)]
    assert sum(m["cost"] for m in u["models"]) == pytest.approx(u["spent"], abs=1e-9)
    assert u["spent"] == pytest.approx(0.25, abs=1e-9)


# --- several servers, one database ------------------------------------------------------------------------------

async def fetch(url: str, method: str = "GET", json=None, email: str | None = None):
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token(email)}"} if email else {})}
    request = HTTPRequest(url, method=method, body=orjson.dumps(json) if json is not None else None, headers=headers,
                          request_timeout=30, allow_nonstandard_methods=True)
    return await AsyncHTTPClient(force_instance=True).fetch(request, raise_error=False)


@pytest.mark.gen_test(timeout=60)
async def test_a_rule_set_through_one_server_applies_to_the_next_call_through_another(make_gateway, serve, store_url,
                                                                                    store_kind):
    # two servers judging admissions in the store: on PostgreSQL, or sharing an SQLite file
    shared = {"url": store_url.replace(".db", "-shared.db"), "admission": "store"} if store_kind == "sqlite" else {}
    gw_a, gw_b = [await make_gateway(storage=shared) for _ in range(2)]
    a, b = serve(gw_a), serve(gw_b)
    user = "two@example.com"
    assert (await fetch(b + CHAT, "POST", chat(), user)).code == 200  # B has read the rules (the file's)
    await settled(gw_b)  # so the day's total set next replaces this call's cost
    r = await fetch(a + "/admin/cost", "POST", {"email": user, "date": TODAY.isoformat(), "cost": 0.5}, ADMIN)
    assert r.code == 200
    r = await fetch(a + "/admin/budget", "POST", {"match": user, "limit": 0.25, "days": 7}, ADMIN)
    assert r.code == 200
    r = await fetch(b + CHAT, "POST", chat(), user)
    assert r.code == 429 and message(r) == "Usage $0.5 / $0.25 in 7 days"
    assert body(await fetch(b + "/usage", email=user))["limit"] == 0.25
    listed = {x["match"]: x for x in body(await fetch(b + "/admin/budget", email=ROOT))["rules"]}
    assert listed[user]["source"] == "database" and listed[user]["updated_by"] == ADMIN
    assert (await fetch(a + f"/admin/budget?match={user}", "DELETE", email=ADMIN)).code == 200
    assert (await fetch(b + CHAT, "POST", chat(), user)).code == 200
    actions = [x["action"] for x in body(await fetch(b + "/admin/audit", email=ADMIN))["data"]]
    assert actions == ["budget.remove", "budget.set", "cost.set"]


@pytest.mark.gen_test
async def test_in_memory_budgets_never_read_the_rules_from_the_store_per_request(call, gateway, upstream):
    assert gateway.books is not None  # a lone server on an SQLite file
    reads = []
    real = gateway.store.rules_version

    async def counted():
        reads.append(1)
        return await real()
    gateway.store.rules_version = counted
    for _ in range(3):
        assert (await call(CHAT, "POST", json=chat(), token=token("mem@example.com"))).code == 200
    r = await call("/admin/budget", "POST", token=token(ADMIN), json={"match": "mem@example.com", "limit": 0, "days": 1})
    assert r.code == 200
    r = await call(CHAT, "POST", json=chat(), token=token("mem@example.com"))
    assert r.code == 429 and message(r).startswith("Usage $0.000018 / $0 in 1 days")
    assert reads == []


# --- BudgetRules.sync: one read for everyone waiting, never one that began before the caller ----------------------

@pytest.mark.gen_test
async def test_sync_shares_reads_and_never_trusts_a_read_that_began_before_it_was_called(store_kind, store_url):
    config = build_config(base_config("http://127.0.0.1:9", store_url), ENV)
    store, other = await open_store(store_url), await open_store(store_url)
    try:
        rules = BudgetRules(config, store)
        await rules.load()
        gate, reads, real = asyncio.Event(), [], store.rules_version

        async def slow_version():
            version = await real()  # read at once, answered when the gate opens: a read "in flight"
            reads.append(version)
            await gate.wait()
            return version
        store.rules_version = slow_version
        early = asyncio.ensure_future(rules.sync())
        for _ in range(100):  # bounded: until the first read has its (old) answer
            if reads:
                break
            await asyncio.sleep(0.01)
        assert reads == [0]
        await other.set_budget_rule({"match": "late@x.com", "limit": 9.0, "days": 3, "period": None, "models": []},
                                    ROOT, time.time())
        waiting = [asyncio.ensure_future(rules.sync()) for _ in range(20)]  # arrived after the rule was committed
        await asyncio.sleep(0.05)
        gate.set()
        await asyncio.wait_for(asyncio.gather(early, *waiting), 10)
        assert reads == [0, 1]  # the read in flight, then one more for all 20
        assert rules.budget_for("late@x.com").limit == 9.0 and rules.source_of("late@x.com") == "database"
        version = rules.version
        await rules.sync()  # nothing changed: the rules (and their version) stay
        assert rules.version == version and reads == [0, 1, 1]
    finally:
        await store.close()
        await other.close()


@pytest.mark.gen_test
async def test_a_reloaded_config_keeps_the_database_rules_on_top(make_gateway, store_kind):
    gw = await make_gateway()
    await gw.rules.set("@school.edu", Budget(limit=4.0, days=2), ROOT)
    data = base_config("http://127.0.0.1:9", gw.store.url)
    data["budget"]["@school.edu"] = {"limit": 0.05, "days": 3}
    data["budget"]["new@example.com"] = {"limit": 7.0, "days": 1}
    gw.reload(build_config(data, ENV))
    assert gw.rules.budget_for("x@school.edu").limit == 4.0  # the database's, over the reloaded file's
    assert gw.rules.budget_for("new@example.com").limit == 7.0
    await gw.rules.remove("@school.edu", ROOT)
    assert gw.rules.budget_for("x@school.edu").limit == 0.05
