"""Budget state held in memory, for a server that is the only writer of its SQLite file.

With one process owning the database, the in-memory view of each user's spend, open holds and
recent requests is complete, so a request can be admitted without a database round trip. The
same rules decide as in the database (budget.decide); only where the numbers come from
differs. Spend is read from the store once per user (by MemoryAdmission, between the ledger's
writes, so charges still queued are counted exactly once) and kept current as charges are queued; holds never
leave memory, since a restart ends every request they belonged to.
"""
from __future__ import annotations

import bisect
import itertools
import math
from datetime import date

from .storage import Decision, Charge, HoldRequest
from .budget import RATE_WINDOW, UserState, decide


class Book:
    """One user's spend per UTC day, open holds and recent admissions."""

    __slots__ = ("days", "since", "holds", "recent", "soonest")

    def __init__(self) -> None:
        self.days: dict[str, float] = {}  # YYYY-MM-DD -> settled cost
        self.since: str | None = None  # days from this one on are loaded; None: spend must be (re)read
        self.holds: dict[int, tuple[float, float]] = {}  # hold id -> (amount, expires)
        self.recent: list[float] = []  # admission times in the rate window, oldest first (with a rate limit)
        self.soonest = math.inf  # no hold expires before this (some may have been released since)

    def tidy(self, now: float) -> None:
        """Drop expired holds and admissions older than the rate window."""
        if self.soonest <= now:
            self.holds = {i: h for i, h in self.holds.items() if h[1] > now}
            self.soonest = min((expires for _, expires in self.holds.values()), default=math.inf)
        if self.recent and self.recent[0] <= now - RATE_WINDOW:
            self.recent = self.recent[bisect.bisect_right(self.recent, now - RATE_WINDOW):]


class Books:
    """Every user's Book, and admission against them."""

    def __init__(self) -> None:
        self.users: dict[str, Book] = {}
        self._ids = itertools.count(1)

    def ready(self, request: HoldRequest) -> bool:
        """Whether the user's spend since request.since is in memory."""
        return self._ready_book(request) is not None

    def _ready_book(self, request: HoldRequest) -> Book | None:
        book = self.users.get(request.email)
        return book if book is not None and book.since is not None and book.since <= request.since.isoformat() else None

    def admit(self, request: HoldRequest, now: float) -> Decision | None:
        """Decide one request and hold its amount if admitted; None if the user's book is not ready."""
        book = self._ready_book(request)
        if book is None:
            return None
        book.tidy(now)
        # admission times are only kept when a rate limit needs them
        holds = book.holds
        state = UserState(book.days.items(), sum(a for a, _ in holds.values()) if holds else 0.0, len(holds),
                          book.recent if request.rpm else None)
        admission, row = decide(request, state, now, self._ids.__next__)
        if row is not None:
            hold_id, _, amount, created, expires = row
            holds[hold_id] = (amount, expires)
            if expires < book.soonest:
                book.soonest = expires
            if request.rpm:
                book.recent.append(created)
        return admission

    def load(self, email: str, since: date, daily: list[tuple[str, float]], unwritten: list[Charge]) -> None:
        """Set a user's spend from the store's daily totals plus charges queued but not yet written."""
        book = self.users.setdefault(email, Book())
        book.since = since.isoformat()
        book.days = {d: c for d, c in daily if d >= book.since}
        for charge in unwritten:
            if charge.email == email:
                self._add_cost(book, charge)

    def settle(self, charge: Charge) -> None:
        """Release the charge's hold and add its cost to the user's day."""
        book = self.users.get(charge.email)
        if book is None:
            return
        if charge.hold_id is not None:
            book.holds.pop(charge.hold_id, None)
        if book.since is not None:
            self._add_cost(book, charge)

    @staticmethod
    def _add_cost(book: Book, charge: Charge) -> None:
        day = charge.day.isoformat()
        if charge.kind != "release" and charge.cost and day >= book.since:
            book.days[day] = book.days.get(day, 0.0) + charge.cost

    def forget_spend(self, email: str | None = None) -> None:
        """Make the next admission re-read spend from the store (one user, or everyone); holds stay."""
        for key in [email] if email else list(self.users):
            if key in self.users:
                self.users[key].since = None

    def held(self, email: str, now: float) -> float:
        """USD held by the user's requests in flight."""
        book = self.users.get(email)
        return sum(a for a, expires in book.holds.values() if expires > now) if book else 0.0

    def prune(self, now: float) -> None:
        """Forget users with no request in flight or in the rate window (their spend is re-read when they return)."""
        for email in list(self.users):
            book = self.users[email]
            book.tidy(now)
            if not book.holds and not book.recent:
                del self.users[email]
