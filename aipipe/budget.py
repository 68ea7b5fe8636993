"""Budget windows: which UTC dates count against a limit, when they reset, and how to say so."""
from __future__ import annotations

import time
from datetime import date, datetime, timedelta, timezone

from .config import Budget

EPOCH = date(1970, 1, 1)
_day: tuple[int, date] = (-1, EPOCH)  # the last UTC date utc_date() worked out, by day number


def utc_date(ts: float) -> date:
    """The UTC date of a Unix time (POSIX days are 86,400 s long), worked out once a day."""
    global _day
    number, day = int(ts // 86400), _day  # one read of the pair: another thread may replace it
    if number != day[0]:
        day = _day = (number, EPOCH + timedelta(days=number))
    return day[1]


def today_utc() -> date:
    """Today's date in UTC."""
    return utc_date(time.time())


def window_start(budget: Budget, today: date) -> date:
    """First UTC date that counts: N days means today and the N-1 before it; periods start at their boundary."""
    if budget.period == "day":
        return today
    if budget.period == "week":
        return today - timedelta(days=today.weekday())  # Monday
    if budget.period == "month":
        return today.replace(day=1)
    return today - timedelta(days=budget.days - 1)


def window_days(budget: Budget, today: date) -> int:
    """How many UTC dates the window spans so far."""
    return (today - window_start(budget, today)).days + 1


def resets_at(budget: Budget, today: date) -> str | None:
    """ISO time when a calendar period starts afresh (None for rolling windows)."""
    if budget.period is None:
        return None
    if budget.period == "day":
        nxt = today + timedelta(days=1)
    elif budget.period == "week":
        nxt = window_start(budget, today) + timedelta(days=7)
    else:
        nxt = (today.replace(day=28) + timedelta(days=4)).replace(day=1)
    return datetime(nxt.year, nxt.month, nxt.day, tzinfo=timezone.utc).isoformat().replace("+00:00", "Z")


def usd(amount: float) -> str:
    """Money for messages: enough digits that sub-cent spend never reads as zero."""
    if amount == 0:
        return "0"
    text = f"{amount:.6f}".rstrip("0").rstrip(".")
    return text if text not in ("0", "-0") else f"{amount:.2e}"


def over_budget_message(spent: float, budget: Budget, hold: float = 0.0) -> str:
    """The 429 text apps match on: `Usage $X / $Y in N days` (or `this month` etc. for periods).

    `spent` counts the holds of calls in flight. When there is budget left but not the most this call
    could cost (`hold`), the message says so, and how to ask for less.
    """
    span = f"this {budget.period}" if budget.period else f"in {budget.days} days"
    message = f"Usage ${usd(spent)} / ${usd(budget.limit)} {span}"
    if spent < budget.limit and hold > 0:
        message += f"; this call could cost up to ${usd(hold)}: set max_tokens lower"
    return message
