"""GET /usage: the caller's spend per day over their budget window (or ?days=N)."""
from __future__ import annotations

import math
import re
import sys
from datetime import timedelta

from ..budget import resets_at, today_utc, window_days, window_start
from ..errors import ApiError
from ..storage import StoreUnavailable
from .base import ApiHandler

WHOLE_NUMBER = re.compile(r"-?[0-9]+")


def int_arg(handler: ApiHandler, name: str, default: int, low: int, high: int) -> int:
    """An integer query argument within [low, high]; 400 naming it otherwise."""
    raw = handler.get_query_argument(name, None)
    if raw is None or raw == "":
        return default
    # int() would also take "+5", "1_0" and other scripts' digits (and refuses over 4300 digits with a ValueError)
    value = int(raw) if WHOLE_NUMBER.fullmatch(raw) and len(raw) <= 20 else None
    if value is None or not low <= value <= high:
        raise ApiError(400, f"{name} must be a whole number from {low} to {high}")
    return value


def usd(value: float) -> float:
    """A cost as JSON can carry it: orjson writes inf and NaN as null. Anything past the largest float reads as
    the largest float, so it stays above every limit (a NaN, in the store since before costs were checked, too)."""
    return value if math.isfinite(value) else sys.float_info.max


def usd_sum(values) -> float:
    """The sum of costs, never inf or NaN however large they are."""
    total = 0.0
    for value in values:
        total = usd(total + usd(value))
    return total


class UsageHandler(ApiHandler):
    """The signed-in user's usage and limit."""

    route_class = "usage"  # for metrics
    token_before_body = True  # a body is refused before it is read when the token is missing or bad

    async def get(self) -> None:
        identity = self.gw.identify(self.request.headers, allow_native=False)
        email = identity.email
        asked = (self.get_query_argument("email", "") or "").strip().lower()
        if asked and asked != email:
            if not self.gw.is_admin(email):
                raise ApiError(403, "Admin access required")
            email = asked
        await self.gw.rules.sync()  # a rule set through another process or instance shows at once
        budget = self.gw.rules.budget_for(email)
        today = today_utc()
        start = window_start(budget, today)
        days = int_arg(self, "days", window_days(budget, today), 1, 366)
        since = min(start, today - timedelta(days=days - 1))
        shown = today - timedelta(days=days - 1)
        try:
            await self.gw.ledger.flush()  # a call that just finished shows in the usage it asks for next
            rows = dict(await self.gw.store.daily_usage(email, since))
            holds = await self.gw.held(email)
            models = await self.gw.store.usage_by_model(email, shown) if self.get_query_argument("by", "") == "model" else None
        except StoreUnavailable:
            raise ApiError(503, "Usage store unavailable, try again shortly") from None
        usage = [{"date": d.isoformat(), "cost": usd(rows.get(d.isoformat(), 0.0))}
                 for d in (shown + timedelta(days=i) for i in range(days))]
        spent, holds = usd_sum(c for d, c in rows.items() if d >= start.isoformat()), usd(holds)
        body = {
            "email": email, "days": days, "cost": usd_sum(u["cost"] for u in usage), "usage": usage,
            "admin": self.gw.is_admin(identity.email), "allowed_models": list(budget.models) or None,
            "limit": budget.limit, "spent": spent, "held": holds, "remaining": max(0.0, budget.limit - spent - holds),
            "window": {"days": budget.days if not budget.period else window_days(budget, today),
                       "period": budget.period, "start": start.isoformat(), "resets": resets_at(budget, today)},
        }
        if models is not None:
            body["models"] = [{**m, "cost": usd(m["cost"])} for m in models]
        self.send_json(body)
