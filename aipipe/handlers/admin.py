"""/admin/*: everyone's usage, the users table, budget rules at runtime, the audit trail, tokens for any email, and
setting a day's cost. Every change an admin makes is recorded in the audit trail with who made it."""
from __future__ import annotations

import math
import re
import time
from datetime import date

from ..auth import mint_token
from ..budget import today_utc, usd as usd_text, window_start
from ..errors import ApiError
from ..rules import parse_match, parse_rule
from ..storage import StoreUnavailable
from ..storage.base import USER_SORTS, UsersQuery
from .base import ApiHandler
from .usage import int_arg, usd

EMAIL = re.compile(r"^[^@\s]+@[^@\s]+$")
# The most one day's cost may be set to: far above any real day, and small enough that a year of such days
# still sums to a finite number (two days of 1.7e308 made /usage report `spent: null`).
MAX_COST = 1e6
# action -> the methods it answers, by name of the handler method
ACTIONS = {
    "usage": {"GET": "_usage"},
    "token": {"GET": "_token"},
    "cost": {"POST": "_set_cost"},
    "budget": {"GET": "_budgets", "POST": "_set_budget", "DELETE": "_remove_budget"},
    "audit": {"GET": "_audit"},
    "users": {"GET": "_users"},
}


def parse_date(value, name: str) -> date:
    """A YYYY-MM-DD date; 400 naming the field otherwise."""
    if not isinstance(value, str) or not re.fullmatch(r"\d{4}-\d{2}-\d{2}", value):
        raise ApiError(400, f"{name} must be a date as YYYY-MM-DD")
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise ApiError(400, f"{name} must be a date as YYYY-MM-DD") from None


def parse_email(value, name: str = "email") -> str:
    """An email address, lower-cased; 400 otherwise."""
    if not isinstance(value, str) or not EMAIL.match(value.strip()):
        raise ApiError(400, f"{name} must be an email address")
    return value.strip().lower()


def choice_arg(handler: ApiHandler, name: str, default: str, choices: tuple[str, ...]) -> str:
    """A query argument that must be one of choices; 400 listing them otherwise."""
    value = handler.get_query_argument(name, None) or default
    if value not in choices:
        raise ApiError(400, f"{name} must be one of {', '.join(choices)}")
    return value


class AdminHandler(ApiHandler):
    """Admin actions; non-admins get 403."""

    route_class = "admin"  # for metrics
    token_before_body = True  # a body is refused before it is read when the token is missing or bad

    async def prepare(self) -> None:
        if self.request.method == "OPTIONS":
            return
        identity = self.gw.identify(self.request.headers, allow_native=False)
        if not self.gw.is_admin(identity.email):
            raise ApiError(403, "Admin access required")
        self.admin_email = identity.email

    async def get(self, action: str) -> None:
        await self._dispatch(action)

    post = put = patch = delete = head = get

    async def _dispatch(self, action: str) -> None:
        methods = ACTIONS.get(action)
        if methods is None:
            raise ApiError(404, "Unknown admin action")
        name = methods.get(self.request.method)
        if name is None:
            verbs = list(methods)
            said = verbs[0] if len(verbs) == 1 else ", ".join(verbs[:-1]) + " or " + verbs[-1]
            raise ApiError(405, f"Use {said} /admin/{action}")
        try:
            await getattr(self, name)()
        except StoreUnavailable:
            raise ApiError(503, "Usage store unavailable, try again shortly") from None

    async def _record(self, action: str, target: str, detail: dict) -> None:
        """One row of the audit trail for a change this admin made."""
        await self.gw.store.add_audit(self.admin_email, action, target, detail, time.time())

    async def _usage(self) -> None:
        email = self.get_query_argument("email", None)
        since, until = self.get_query_argument("from", None), self.get_query_argument("to", None)
        rows = await self.gw.store.all_usage(
            email=parse_email(email) if email else None,
            since=parse_date(since, "from") if since else None,
            until=parse_date(until, "to") if until else None,
            limit=int_arg(self, "limit", 1000, 1, 10000), offset=int_arg(self, "offset", 0, 0, 10**9))
        self.send_json({"data": [{**row, "cost": usd(row["cost"])} for row in rows]})

    async def _token(self) -> None:
        email = parse_email(self.get_query_argument("email", None) or self.admin_email)
        await self._record("token.mint", email, {})  # who minted for whom; never the token itself
        self.send_json({"token": mint_token(email, self.gw.config.secret, self.gw.config.salt_for(email)), "email": email})

    async def _set_cost(self) -> None:
        data = self.json_body()
        for field in ("email", "date", "cost"):
            if field not in data:
                raise ApiError(400, f"Missing field: {field}")
        email = parse_email(data["email"])
        day = parse_date(data["date"], "date")
        cost = data["cost"]
        if isinstance(cost, bool) or not isinstance(cost, (int, float)) or not math.isfinite(cost):
            raise ApiError(400, "cost must be a number of USD")
        if cost < 0:
            raise ApiError(400, "cost must not be negative")
        if cost > MAX_COST:
            raise ApiError(400, f"cost must be at most {MAX_COST:,.0f} USD")
        await self.gw.set_cost(email, day, float(cost))
        await self._record("cost.set", email, {"date": day.isoformat(), "cost": float(cost)})
        self.send_json({"message": f"Cost for {email} on {day.isoformat()} set to {cost}"})

    async def _budgets(self) -> None:
        await self.gw.rules.sync()
        self.send_json({"rules": self.gw.rules.listing()})

    async def _set_budget(self) -> None:
        match, budget = parse_rule(self.json_body())
        await self.gw.rules.set(match, budget, self.admin_email)
        rule = next(r for r in self.gw.rules.listing() if r["match"] == match)
        span = f"this {budget.period}" if budget.period else f"in {budget.days} days"  # as the 429 says it
        self.send_json({"message": f"Budget for {match} set to ${usd_text(budget.limit)} {span}", "rule": rule})

    async def _remove_budget(self) -> None:
        match = self.get_query_argument("match", None)
        if match is None:
            raise ApiError(400, "Missing argument: match")
        match = parse_match(match)
        removed = await self.gw.rules.remove(match, self.admin_email)
        in_file = self.gw.rules.source_of(match) == "config"
        if removed is None:
            where = ": it is in the config file, change it there" if in_file else ""
            raise ApiError(404, f"No budget rule for {match} was set here{where}")
        after = "; the config file's rule applies again" if in_file else ""
        self.send_json({"message": f"Budget rule for {match} removed{after}"})

    async def _audit(self) -> None:
        rows = await self.gw.store.audit(limit=int_arg(self, "limit", 100, 1, 1000),
                                         offset=int_arg(self, "offset", 0, 0, 10**9))
        self.send_json({"data": rows})

    async def _users(self) -> None:
        query = UsersQuery(
            search=self.get_query_argument("q", "").strip()[:320], sort=choice_arg(self, "sort", "spent", USER_SORTS),
            descending=choice_arg(self, "order", "desc", ("asc", "desc")) == "desc",
            limit=int_arg(self, "limit", 50, 1, 1000), offset=int_arg(self, "offset", 0, 0, 10**9))
        await self.gw.rules.sync()
        await self.gw.ledger.flush()  # a call that just finished is in the table
        today = today_utc()
        windows = [(match, window_start(b, today), b.limit) for match, b in self.gw.rules.rules.items()]
        found = await self.gw.store.users_summary(windows, today, query)
        data = [{**row, **{k: usd(row[k]) for k in ("spent", "remaining", "share")}} for row in found["data"]]
        self.send_json({"total": found["total"], "limit": query.limit, "offset": query.offset, "data": data})

