"""The storage interface every backend implements, and the records it speaks in."""
from __future__ import annotations

import json
import logging
import math
import time
import unicodedata
from dataclasses import dataclass
from datetime import date

log = logging.getLogger("aipipe.storage")


class StoreUnavailable(RuntimeError):
    """The database cannot be reached right now; callers answer 503 and retry later."""

    # (hold id, email) of holds a failed reserve may still have placed: its COMMIT was sent, the answer lost
    placed: tuple = ()


class RowRefused(ValueError):
    """The store refused the data of a row in the batch (not a connection problem): the same rows fail again."""


@dataclass(slots=True)
class HoldRequest:
    """Ask to admit one request for `email` and hold `amount` USD (the most it can cost) while it runs."""

    email: str
    amount: float
    since: date  # first UTC date of the budget window
    limit: float
    max_inflight: int = 0  # 0 = no cap
    rpm: int = 0  # 0 = no limit
    hold_seconds: float = 600.0


@dataclass(slots=True)
class Decision:
    """The answer to a HoldRequest: a hold id when admitted, else why not."""

    hold_id: int | None
    spent: float  # settled cost in the window
    held: float  # open holds, before this one
    refused: str | None = None  # "budget" | "concurrency" | "rate"
    retry_after: int = 0


@dataclass(slots=True)  # not frozen: built for every request, and frozen dataclasses are slow to build
class Charge:
    """A finished request: its ledger row, and the hold it releases."""

    email: str
    day: date
    cost: float
    hold_id: int | None = None
    kind: str = "request"  # "request" | "adjust" | "release" (no ledger row)
    provider: str = ""
    model: str = ""
    input_tokens: int = 0
    output_tokens: int = 0
    status: int = 0
    duration_ms: float = 0.0
    streamed: bool = False
    aborted: bool = False
    ts: float = 0.0
    charge_id: str = ""  # unique per charge (the ledger assigns it), so a retried batch is written once


MAX_EMAIL, MAX_PROVIDER, MAX_MODEL = 320, 64, 256  # characters kept of each text field
MAX_COUNT, MAX_STATUS = 2**62, 2**31 - 1  # within BIGINT and INTEGER


def charge_row(c: Charge) -> tuple:
    """A Charge's ledger row, cleaned so a store takes it: (charge_id, ts, email, day, kind, provider, model,
    input_tokens, output_tokens, cost, status, duration_ms, streamed, aborted)."""
    return (c.charge_id or None, finite(c.ts, time.time()), clean_text(c.email, MAX_EMAIL), c.day, c.kind,
            clean_text(c.provider, MAX_PROVIDER), clean_text(c.model, MAX_MODEL), count(c.input_tokens, MAX_COUNT),
            count(c.output_tokens, MAX_COUNT), safe_cost(c), count(c.status, MAX_STATUS),
            finite(c.duration_ms, 0.0), bool(c.streamed), bool(c.aborted))


def clean_text(value, cap: int):
    """Text without control characters (PostgreSQL refuses NUL) or lone surrogates, at most cap characters."""
    if type(value) is str and len(value) <= cap and value.isprintable():
        return value
    if not isinstance(value, str):
        return value  # not text at all: the store refuses the row and the ledger sets it aside
    return "".join(ch for ch in value if unicodedata.category(ch) not in ("Cc", "Cs"))[:cap]


def count(value, cap: int) -> int:
    """A whole number in [0, cap]; 0 for what is not a number."""
    if type(value) is int and 0 <= value <= cap:
        return value
    try:
        return min(max(int(value), 0), cap)
    except (TypeError, ValueError, OverflowError):
        return 0


def finite(value, default: float) -> float:
    """value as a float, or default when it is not a finite number."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        return default
    return value if math.isfinite(value) else default


def safe_cost(c: Charge) -> float:
    """The charge's cost; 0 (logged) when it is not a finite number, or negative outside an adjustment,
    since a bad price must never lower anyone's spend."""
    cost = c.cost
    if type(cost) is float and 0.0 <= cost < math.inf:
        return cost
    if not isinstance(cost, bool) and isinstance(cost, (int, float)) and math.isfinite(cost) and (
            cost >= 0 or c.kind == "adjust"):
        return float(cost)
    log.error("charge %s for %s has cost %r: recorded as 0", c.charge_id or "(no id)", c.email, cost)
    return 0.0


class Store:
    """Async storage for budgets, holds and the cost ledger. All money is USD."""

    url: str = ""
    single_file: bool = False  # a file on this machine: a server that is its only user may keep budgets in memory

    async def setup(self) -> None:
        """Create or migrate the schema (safe to run from several processes at once)."""
        raise NotImplementedError

    async def close(self) -> None:
        """Release connections."""
        raise NotImplementedError

    def claim(self, exclusive: bool) -> None:
        """Register this server as the store's only user (exclusive) or one of several; StoreConfigError if taken."""

    async def changed_elsewhere(self) -> bool:
        """Whether another connection has written since the last call."""
        return True

    async def reserve(self, requests: list[HoldRequest], now: float) -> list[Decision]:
        """Admit and hold each request in order, atomically, in one transaction."""
        raise NotImplementedError

    async def settle(self, charges: list[Charge]) -> None:
        """Write ledger rows, add to daily totals and release holds, in one transaction; a charge whose charge_id
        is already in the ledger is skipped (rows, totals). RowRefused when a row's data is refused."""
        raise NotImplementedError

    async def spend(self, email: str, since: date) -> float:
        """Settled cost for email from `since` (a UTC date) to now."""
        raise NotImplementedError

    async def open_holds(self, email: str, now: float) -> float:
        """USD currently held for email's requests in flight."""
        raise NotImplementedError

    async def daily_usage(self, email: str, since: date) -> list[tuple[str, float]]:
        """[(YYYY-MM-DD, cost)] for email from `since`, oldest first, days with spend only."""
        raise NotImplementedError

    async def usage_by_model(self, email: str, since: date) -> list[dict]:
        """Per provider and model: requests, tokens and cost from the ledger since `since`."""
        raise NotImplementedError

    async def all_usage(
        self, email: str | None = None, since: date | None = None, until: date | None = None,
        limit: int = 1000, offset: int = 0,
    ) -> list[dict]:
        """[{email, date, cost}] newest first, optionally filtered, paged."""
        raise NotImplementedError

    async def set_cost(self, email: str, day: date, cost: float, now: float) -> None:
        """Overwrite one day's total, recording the difference as an "adjust" ledger row."""
        raise NotImplementedError

    async def ledger(self, email: str | None = None, limit: int = 100) -> list[dict]:
        """Newest ledger rows, optionally for one email."""
        raise NotImplementedError

    async def prune(self, now: float) -> None:
        """Drop released and expired holds older than the rate window."""
        raise NotImplementedError

    async def rules_version(self) -> int:
        """A number that changes with every change to the budget rules kept in the store (one row read)."""
        raise NotImplementedError

    async def budget_rules(self) -> tuple[int, list[dict]]:
        """(rules_version, [{match, limit, days, period, models, updated, updated_by}]) read in one snapshot."""
        raise NotImplementedError

    async def set_budget_rule(self, rule: dict, admin: str, now: float) -> int:
        """Insert or replace the rule for rule["match"] and write its audit row, in one transaction; the new version."""
        raise NotImplementedError

    async def remove_budget_rule(self, match: str, admin: str, now: float) -> dict | None:
        """Delete match's rule and write its audit row, in one transaction; the rule removed, or None if none."""
        raise NotImplementedError

    async def add_audit(self, admin: str, action: str, target: str, detail: dict, now: float) -> None:
        """Record one admin change (never a credential) in the audit trail."""
        raise NotImplementedError

    async def audit(self, limit: int = 100, offset: int = 0) -> list[dict]:
        """[{id, ts, admin, action, target, detail}] newest first, paged."""
        raise NotImplementedError

    async def users_summary(self, windows: list[tuple[str, date, float]], today: date, query: UsersQuery) -> dict:
        """{total, data: [{email, spent, limit, remaining, share, requests, last_call}]}: everyone with spend or
        requests in their budget window (`windows`: (match, first day, limit) per rule, "*" and "@domain" included;
        no rule means a limit of 0 from `today`), filtered, sorted and paged in the database."""
        raise NotImplementedError


@dataclass(frozen=True)
class UsersQuery:
    """Which users_summary rows to return: email containing `search`, ordered by `sort`, one page."""

    search: str = ""
    sort: str = "spent"  # one of USER_SORTS
    descending: bool = True
    limit: int = 50
    offset: int = 0


USER_SORTS = ("email", "spent", "limit", "remaining", "share", "requests", "last_call")
ADJUSTMENTS = ("admin", "adjustment")  # the (provider, model) usage_by_model reports admins' corrections under


def model_row(r) -> dict:
    """A usage_by_model row as a dict."""
    provider, model, n, tin, tout, cost = r
    return {"provider": provider, "model": model, "requests": int(n), "input_tokens": int(tin or 0),
            "output_tokens": int(tout or 0), "cost": float(cost or 0)}


def rule_row(match: str, limit, days, period, models_json: str, updated, updated_by) -> dict:
    """A budget_rules row as a dict (models stored as JSON text)."""
    return {"match": match, "limit": float(limit), "days": int(days), "period": period,
            "models": list(json.loads(models_json or "[]")), "updated": float(updated), "updated_by": updated_by}


def budget_detail(rule: dict | None) -> dict | None:
    """What an audit row keeps of a budget rule: its terms, not who set it when."""
    if rule is None:
        return None
    return {"limit": rule["limit"], "days": rule["days"], "period": rule["period"], "models": list(rule["models"])}


def audit_row(id_, ts, admin, action, target, detail_json: str) -> dict:
    """An audit row as a dict (detail stored as JSON text)."""
    return {"id": int(id_), "ts": float(ts), "admin": admin, "action": action, "target": target,
            "detail": json.loads(detail_json or "{}")}


def user_row(email, limit, spent, requests, last_call) -> dict:
    """A users_summary row as a dict: remaining and share follow from limit and spend, as the SQL sorted them."""
    limit, spent = float(limit), float(spent or 0)
    return {"email": email, "spent": spent, "limit": limit, "remaining": max(0.0, limit - spent),
            "share": share_of(spent, limit), "requests": int(requests or 0),
            "last_call": float(last_call) if last_call is not None else None}


def share_of(spent: float, limit: float) -> float:
    """The part of the limit used: spend / limit, and 1 for any spend against a zero limit."""
    if limit > 0:
        return spent / limit
    return 1.0 if spent > 0 else 0.0


def usage_filter(email, since, until, mark=lambda i: "?", dates_as_text: bool = True) -> tuple[str, tuple]:
    """WHERE clause and arguments for all_usage filters; `mark(i)` renders the i-th placeholder.

    Dates (date or "YYYY-MM-DD") are passed as ISO text, or as `date` objects when dates_as_text is false.
    """
    clauses, args = [], []
    for column, op, value in (("email", "=", email), ("date", ">=", since), ("date", "<=", until)):
        if value is not None:
            if column == "date":
                text = value if isinstance(value, str) else value.isoformat()
                value = text if dates_as_text else date.fromisoformat(text)
            args.append(value)
            clauses.append(f"{column} {op} {mark(len(args))}")
    return ("WHERE " + " AND ".join(clauses) if clauses else ""), tuple(args)


def users_summary_tail(money_sum: str, greatest: str) -> tuple[str, dict[str, str]]:
    """The part of the users summary both backends write alike, given the SQL for summing money and for the larger
    of two numbers: from the CTEs `windows` (email, since, lim), `days` and `calls` on, and the sort columns."""
    sql = f"""    spend AS (SELECT w.email, {money_sum} AS spent FROM windows w
        JOIN days x ON x.email = w.email AND x.date >= w.since GROUP BY w.email),
    counted AS (SELECT w.email, COUNT(*) AS requests, MAX(c.ts) AS last_call FROM windows w
        JOIN calls c ON c.email = w.email AND c.date >= w.since GROUP BY w.email),
    summary AS (SELECT w.email, w.lim AS lim, COALESCE(sp.spent, 0.0) AS spent, COALESCE(n.requests, 0) AS requests,
            n.last_call FROM windows w LEFT JOIN spend sp ON sp.email = w.email LEFT JOIN counted n ON n.email = w.email
        WHERE sp.email IS NOT NULL OR n.email IS NOT NULL)
    SELECT email, lim, spent, requests, last_call, COUNT(*) OVER () FROM summary"""
    order = {"email": "email", "spent": "spent", "limit": "lim", "remaining": f"{greatest}(lim - spent, 0.0)",
             "share": "CASE WHEN lim > 0 THEN spent / lim WHEN spent > 0 THEN 1.0 ELSE 0.0 END",
             "requests": "requests", "last_call": "COALESCE(last_call, 0)"}
    return sql, order
