"""/admin/*: everyone's usage, tokens for any email, and setting a day's cost."""
from __future__ import annotations

import math
import re
from datetime import date

from ..auth import mint_token
from ..errors import ApiError
from ..storage import StoreUnavailable
from .base import ApiHandler
from .usage import int_arg, usd

EMAIL = re.compile(r"^[^@\s]+@[^@\s]+$")
# The most one day's cost may be set to: far above any real day, and small enough that a year of such days
# still sums to a finite number (two days of 1.7e308 made /usage report `spent: null`).
MAX_COST = 1e6


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
        method = self.request.method
        try:
            if action == "usage" and method == "GET":
                return await self._usage()
            if action == "token" and method == "GET":
                return self._token()
            if action == "cost":
                if method != "POST":
                    raise ApiError(405, "Use POST /admin/cost")
                return await self._set_cost()
            if action in ("usage", "token"):
                raise ApiError(405, f"Use GET /admin/{action}")
        except StoreUnavailable:
            raise ApiError(503, "Usage store unavailable, try again shortly") from None
        raise ApiError(404, "Unknown admin action")

    async def _usage(self) -> None:
        email = self.get_query_argument("email", None)
        since, until = self.get_query_argument("from", None), self.get_query_argument("to", None)
        rows = await self.gw.store.all_usage(
            email=parse_email(email) if email else None,
            since=parse_date(since, "from") if since else None,
            until=parse_date(until, "to") if until else None,
            limit=int_arg(self, "limit", 1000, 1, 10000), offset=int_arg(self, "offset", 0, 0, 10**9))
        self.send_json({"data": [{**row, "cost": usd(row["cost"])} for row in rows]})

    def _token(self) -> None:
        email = parse_email(self.get_query_argument("email", None) or self.admin_email)
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
        self.send_json({"message": f"Cost for {email} on {day.isoformat()} set to {cost}"})
