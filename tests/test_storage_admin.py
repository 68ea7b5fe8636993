"""The store's side of the admin pages, on SQLite and on PostgreSQL: budget rules and their version, the audit
trail, and the users summary (spend, requests and last call in each user's own window, sorted and paged in SQL)."""
from __future__ import annotations

from datetime import timedelta

import pytest

from aipipe.storage import open_store
from aipipe.storage.base import UsersQuery

from .test_storage_contract import D0, NOW, charge, more_stores, store  # noqa: F401 (fixtures)

RULE = {"match": "a@x.com", "limit": 5.0, "days": 7, "period": None, "models": ["gpt-4o-mini", "claude-*"]}
WEEK, MONTH = D0 - timedelta(days=6), D0 - timedelta(days=29)  # first days of a 7-day and a 30-day window
WINDOWS = [("*", WEEK, 1.0), ("@school.edu", MONTH, 0.5), ("rich@x.com", D0, 10.0)]


@pytest.mark.gen_test
async def test_setting_replacing_and_removing_a_rule_moves_the_version_and_is_audited(store, more_stores):
    assert await store.budget_rules() == (0, []) and await store.rules_version() == 0
    assert await store.set_budget_rule(RULE, "root@example.com", NOW) == 1
    assert await store.set_budget_rule({**RULE, "limit": 2.5, "days": 1, "period": "week", "models": []},
                                       "boss@example.com", NOW + 1) == 2
    version, rules = await store.budget_rules()
    assert version == 2 and rules == [{"match": "a@x.com", "limit": 2.5, "days": 1, "period": "week", "models": [],
                                       "updated": NOW + 1, "updated_by": "boss@example.com"}]
    (other,) = await more_stores(1)  # another process or instance sees the same
    assert await other.rules_version() == 2 and (await other.budget_rules())[1] == rules

    removed = await other.remove_budget_rule("a@x.com", "root@example.com", NOW + 2)
    assert removed["limit"] == 2.5 and removed["period"] == "week"
    assert await store.budget_rules() == (3, [])
    assert await store.remove_budget_rule("a@x.com", "root@example.com", NOW + 3) is None  # nothing to remove
    assert await store.rules_version() == 3  # and nothing changed

    audit = await store.audit()
    assert [(a["admin"], a["action"], a["target"], a["ts"]) for a in audit] == [
        ("root@example.com", "budget.remove", "a@x.com", NOW + 2),
        ("boss@example.com", "budget.set", "a@x.com", NOW + 1),
        ("root@example.com", "budget.set", "a@x.com", NOW)]
    assert audit[2]["detail"] == {"limit": 5.0, "days": 7, "period": None, "models": ["gpt-4o-mini", "claude-*"],
                                  "previous": None}
    assert audit[1]["detail"]["previous"]["limit"] == 5.0 and audit[1]["detail"]["limit"] == 2.5
    assert audit[0]["detail"] == {"removed": {"limit": 2.5, "days": 1, "period": "week", "models": []}}
    assert audit[0]["id"] > audit[1]["id"] > audit[2]["id"]


@pytest.mark.gen_test
async def test_rules_survive_reopening_the_store(store_kind, store_url):
    first = await open_store(store_url)
    try:
        await first.set_budget_rule({**RULE, "match": "@school.edu"}, "root@example.com", NOW)
    finally:
        await first.close()
    again = await open_store(store_url)  # setup() on a current schema keeps the rows
    try:
        version, rules = await again.budget_rules()
        assert version == 1 and [r["match"] for r in rules] == ["@school.edu"]
    finally:
        await again.close()


@pytest.mark.gen_test
async def test_audit_is_newest_first_and_paged_and_keeps_its_detail(store):
    for i in range(5):
        await store.add_audit("root@example.com", "token.mint", f"u{i}@x.com", {"n": i}, NOW + i)
    assert [a["target"] for a in await store.audit(limit=2, offset=1)] == ["u3@x.com", "u2@x.com"]
    assert [a["detail"] for a in await store.audit(limit=10)] == [{"n": i} for i in range(4, -1, -1)]
    assert await store.audit(offset=5) == []


async def spread(store) -> None:
    """Charges for a few users over the last 40 days of D0."""
    await store.settle([
        charge(email="a@x.com", cost=0.25, day=D0, ts=NOW),  # "*": 7 days, $1
        charge(email="a@x.com", cost=0.125, day=D0 - timedelta(days=6), ts=NOW - 6 * 86400),
        charge(email="a@x.com", cost=4.0, day=D0 - timedelta(days=7), ts=NOW - 7 * 86400),  # outside its window
        charge(email="kid@school.edu", cost=0.2, day=D0 - timedelta(days=20), ts=NOW - 20 * 86400),  # 30 days, $0.5
        charge(email="Big@School.EDU", cost=0.75, day=D0, ts=NOW - 5),  # a domain rule whatever the case
        charge(email="rich@x.com", cost=1.0, day=D0, ts=NOW - 1),  # its own rule: today only, $10
        charge(email="rich@x.com", cost=3.0, day=D0 - timedelta(days=1), ts=NOW - 86400),
        charge(email="free@x.com", cost=0.0, day=D0, ts=NOW - 2),  # a call that cost nothing still counts
        charge(email="gone@x.com", cost=0.5, day=D0 - timedelta(days=10), ts=NOW - 10 * 86400),  # nothing in window
        charge(email="nobody@nowhere.org", cost=0.01, day=D0, ts=NOW - 3),
    ])


def by_email(result: dict) -> dict:
    return {row["email"]: row for row in result["data"]}


@pytest.mark.gen_test
async def test_users_summary_counts_each_user_in_their_own_window(store):
    await spread(store)
    await store.set_cost("a@x.com", D0 - timedelta(days=1), 0.0625, NOW)  # an adjustment: spend, not a request
    found = await store.users_summary(WINDOWS, D0, UsersQuery(limit=100))
    rows = by_email(found)
    assert found["total"] == 6 and set(rows) == {
        "a@x.com", "kid@school.edu", "Big@School.EDU", "rich@x.com", "free@x.com", "nobody@nowhere.org"}
    a = rows["a@x.com"]
    assert a["spent"] == pytest.approx(0.4375, abs=1e-9) and a["limit"] == 1.0
    assert a["remaining"] == pytest.approx(0.5625, abs=1e-9) and a["share"] == pytest.approx(0.4375, abs=1e-9)
    assert a["requests"] == 2 and a["last_call"] == NOW
    assert rows["kid@school.edu"]["limit"] == 0.5 and rows["kid@school.edu"]["spent"] == pytest.approx(0.2, abs=1e-9)
    big = rows["Big@School.EDU"]
    assert big["limit"] == 0.5 and big["remaining"] == 0 and big["share"] == pytest.approx(1.5, abs=1e-9)
    assert rows["rich@x.com"]["spent"] == pytest.approx(1.0, abs=1e-9) and rows["rich@x.com"]["requests"] == 1
    assert rows["free@x.com"]["spent"] == 0 and rows["free@x.com"]["requests"] == 1
    assert rows["nobody@nowhere.org"]["limit"] == 1.0  # "*"
    # with no rule at all a user has a zero limit over today, and any spend uses all of it
    (nobody,) = (await store.users_summary(WINDOWS[1:], D0, UsersQuery(search="nowhere")))["data"]
    assert (nobody["limit"], nobody["share"], nobody["remaining"]) == (0, 1.0, 0)
    (a,) = (await store.users_summary(WINDOWS[1:], D0, UsersQuery(search="a@x.com")))["data"]
    assert a["spent"] == pytest.approx(0.25, abs=1e-9) and a["requests"] == 1  # today's only
    assert all(isinstance(r["spent"], float) and isinstance(r["requests"], int) for r in found["data"])


@pytest.mark.gen_test
@pytest.mark.parametrize("sort", ["email", "spent", "limit", "remaining", "share", "requests", "last_call"])
async def test_users_summary_sorts_every_column_both_ways(store, sort):
    await spread(store)
    for descending in (False, True):
        rows = (await store.users_summary(WINDOWS, D0, UsersQuery(sort=sort, descending=descending, limit=100)))["data"]
        keys = [(r[sort], r["email"]) for r in rows]
        want = sorted(keys, key=lambda k: k[1])  # ties by email, ascending either way
        want = sorted(want, key=lambda k: k[0], reverse=descending)
        assert [k[0] for k in keys] == [k[0] for k in want], (sort, descending)
        assert len(rows) == 6


@pytest.mark.gen_test
async def test_users_summary_filters_by_part_of_the_email_and_pages(store):
    await spread(store)
    found = await store.users_summary(WINDOWS, D0, UsersQuery(search="SCHOOL", sort="email", descending=False))
    assert [r["email"] for r in found["data"]] == ["Big@School.EDU", "kid@school.edu"] and found["total"] == 2
    pages = [await store.users_summary(WINDOWS, D0, UsersQuery(sort="email", descending=False, limit=4, offset=o))
             for o in (0, 4)]
    assert [len(p["data"]) for p in pages] == [4, 2] and {p["total"] for p in pages} == {6}
    emails = [r["email"] for p in pages for r in p["data"]]
    assert emails == sorted(emails) and len(set(emails)) == 6
    past = await store.users_summary(WINDOWS, D0, UsersQuery(offset=50))
    assert past == {"total": 6, "data": []}
    assert await store.users_summary(WINDOWS, D0, UsersQuery(search="zzz")) == {"total": 0, "data": []}


@pytest.mark.gen_test
async def test_users_summary_pages_through_thousands_of_users(store):
    n = 3000
    await store.settle([charge(email=f"user{i:04d}@x.com", cost=0.0001 * (i % 97 + 1), day=D0, ts=NOW + i)
                        for i in range(n)])
    seen, offset = [], 0
    for _ in range(10):  # bounded: 3000 users in pages of 1000
        page = await store.users_summary(WINDOWS, D0, UsersQuery(sort="spent", limit=1000, offset=offset))
        assert page["total"] == n
        if not page["data"]:
            break
        seen += page["data"]
        offset += 1000
    assert len(seen) == n and len({r["email"] for r in seen}) == n
    spends = [r["spent"] for r in seen]
    assert spends == sorted(spends, reverse=True)
    assert sum(spends) == pytest.approx(sum(0.0001 * (i % 97 + 1) for i in range(n)), abs=1e-9)
