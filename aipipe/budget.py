"""Budget windows: which UTC dates count against a limit, when they reset, and how to say so."""
from __future__ import annotations

import time
from fnmatch import fnmatchcase
from functools import lru_cache
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone

from .config import Budget
from .storage.base import Decision, HoldRequest

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


def model_allowed(patterns: tuple[str, ...], provider: str, model: str) -> bool:
    """Whether a budget's model patterns admit `model` as the request names it, or as `<provider>/<model>` (so
    "openai/*" admits every model of /openai/ and OpenRouter's openai/... models alike). Shell-style patterns,
    case-insensitive."""
    name = model.lower()
    qualified = f"{provider}/{name}"
    return any(fnmatchcase(name, p) or fnmatchcase(qualified, p) for p in _lowered(patterns))


@lru_cache(maxsize=256)
def _lowered(patterns: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(p.lower() for p in patterns)


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


RATE_WINDOW = 60.0  # seconds over which requests per minute are counted


@dataclass(slots=True)
class UserState:
    """What a backend read about one user inside the reserve transaction."""

    daily: list[tuple[str, float]]  # (YYYY-MM-DD, cost) from the earliest `since` in the batch
    held: float = 0.0
    inflight: int = 0
    recent: list[float] | None = None  # creation times of holds in the rate window, oldest first


def decide_batch(
    requests: list[HoldRequest], states: dict[str, UserState], now: float, new_id
) -> tuple[list[Decision], list[tuple]]:
    """Admit requests in order against each user's state; returns admissions and hold rows to insert.

    Each admitted request's hold counts against the ones after it in the same batch (see decide), so a
    batch admits no more than fits the limit together.
    """
    admissions, rows = [], []
    for req in requests:
        admission, row = decide(req, states[req.email], now, new_id)
        admissions.append(admission)
        if row is not None:
            rows.append(row)
    return admissions, rows


def decide(req: HoldRequest, st: UserState, now: float, new_id) -> tuple[Decision, tuple | None]:
    """Admit one request against its user's state: the admission, and the hold row to insert (None if refused).

    A request is admitted when settled spend + open holds + its own hold <= limit (and spend + holds <
    limit, so a user with nothing left is refused even a call that costs nothing), the user has fewer
    than max_inflight requests open and fewer than rpm requests in the last minute. A hold being the
    most its call can cost (providers.base.set_hold), spend then stays within the limit when the calls
    in flight settle. An admitted request's hold is added to st.
    """
    since = req.since.isoformat()
    spent = sum(cost for day, cost in st.daily if day >= since)  # sum(), as /usage adds (compensated from 3.12)
    recent = st.recent or ()
    if req.max_inflight and st.inflight >= req.max_inflight:
        return Decision(None, spent, st.held, "concurrency", 1), None
    if req.rpm and len(recent) >= req.rpm:
        wait = recent[len(recent) - req.rpm] + RATE_WINDOW - now
        return Decision(None, spent, st.held, "rate", max(1, int(wait + 0.999))), None
    committed = spent + st.held
    if committed >= req.limit or committed + req.amount > req.limit:
        return Decision(None, spent, st.held, "budget"), None
    hold_id = new_id()
    admission = Decision(hold_id, spent, st.held)
    st.held += req.amount
    st.inflight += 1
    if req.rpm:  # later requests of the batch count this one
        st.recent = [*recent, now]
    return admission, (hold_id, req.email, req.amount, now, now + req.hold_seconds)


def add_hold(state: UserState, amount: float, created: float, is_open: bool, now: float) -> None:
    """Fold one hold row into a user's state."""
    if is_open:
        state.held += amount
        state.inflight += 1
    if created > now - RATE_WINDOW:
        state.recent = (state.recent or []) + [created]
