"""Admission: whether a request may start, and the hold on its user's budget while it runs.

One interface, two implementations, chosen once by `choose_admission`:
- MemoryAdmission, for a server that is the only user of its SQLite file: budgets live in memory
  (aipipe.books) and a request is decided without a database round trip; only a user's first request
  waits, for their spend to be read.
- StoreAdmission, for everything else (several processes or instances, PostgreSQL): every admission is a
  database transaction, batched with the others waiting.
Both apply the same rules (aipipe.budget.decide). Both run their database work on the ledger's writer,
between its writes (Ledger.between_writes), so charges already made count against the next admission and
a spend read is never half written.
"""
from __future__ import annotations

import asyncio
import logging
import time
from datetime import date

from .books import Books
from .ledger import LINGER, MAX_BATCH, Ledger
from .storage import Charge, Decision, HoldRequest, Store, StoreUnavailable

log = logging.getLogger("aipipe.admission")
PRUNE_SECONDS = 60.0  # how often released and expired holds are dropped
WATCH_SECONDS = 1.0  # memory mode: how often the file is checked for writes by other programs


class Admission:
    """Decides requests against budgets, concurrency and rate limits, and holds their most possible cost."""

    in_memory = False  # budgets are in this process's memory (the store file is claimed exclusively)
    books: Books | None = None

    def __init__(self, store: Store, ledger: Ledger, retry_seconds: float = 1.0) -> None:
        self.store, self.ledger, self.retry_seconds = store, ledger, retry_seconds
        self._down_until = 0.0  # decisions fail at once until then, after the store failed one
        self._tasks: list[asyncio.Task] = []

    def decide_now(self, request: HoldRequest) -> Decision | None:
        """The decision when it takes no wait, else None (then `decide`)."""
        if time.monotonic() < self._down_until:  # don't make every caller wait out a dead connection
            raise StoreUnavailable("store was unavailable a moment ago")
        return None

    async def decide(self, request: HoldRequest) -> Decision:
        """Admit (hold request.amount) or refuse one request; StoreUnavailable when that cannot be decided."""
        raise NotImplementedError

    def settled(self, charge: Charge) -> bool:
        """A call ended: release its hold. Whether its charge still has to be written to the store."""
        return True

    async def held(self, email: str, now: float) -> float:
        """USD held right now by email's requests in flight."""
        return await self.store.open_holds(email, now)

    def forget_spend(self, email: str | None = None) -> None:
        """Spend changed outside the ledger (an admin correction): read it afresh (one user, or everyone)."""

    async def prune(self, now: float) -> None:
        """Drop holds that were released or left behind by a crash."""
        await self.store.prune(now)

    async def start(self) -> None:
        """Start background work."""
        self._tasks.append(asyncio.get_running_loop().create_task(self._prune_forever()))

    async def close(self) -> None:
        """Stop background work; decisions still waiting fail."""
        for task in self._tasks:
            task.cancel()

    async def _prune_forever(self) -> None:
        while True:
            await asyncio.sleep(PRUNE_SECONDS)
            try:
                await self.prune(time.time())
            except Exception as e:
                log.warning("pruning holds failed: %s", e)

    def _store_failed(self, waiting: list[tuple[HoldRequest, asyncio.Future]], error: Exception) -> None:
        """Fail the decisions waiting, and the ones that come in the next retry_seconds."""
        self._down_until = time.monotonic() + self.retry_seconds
        error = error if isinstance(error, StoreUnavailable) else StoreUnavailable(str(error))
        for _, fut in waiting:
            if not fut.done():
                fut.set_exception(error)


class StoreAdmission(Admission):
    """Every decision a transaction in the store; the requests waiting are decided together, in order."""

    def __init__(self, store: Store, ledger: Ledger, retry_seconds: float = 1.0) -> None:
        super().__init__(store, ledger, retry_seconds)
        self._waiting: list[tuple[HoldRequest, asyncio.Future]] = []

    async def decide(self, request: HoldRequest) -> Decision:
        self.decide_now(request)
        fut = asyncio.get_running_loop().create_future()
        self._waiting.append((request, fut))
        if len(self._waiting) == 1:
            self.ledger.between_writes(self._write)
        return await fut

    async def _write(self) -> None:
        if self.ledger.failing and self.ledger.pending:
            # charges are not being written: admitting on holds they would release could overspend, and the
            # store would likely refuse anyway
            waiting, self._waiting = self._waiting, []
            self._store_failed(waiting, StoreUnavailable("charges could not be written"))
            return
        while self._waiting:
            batch, self._waiting = self._waiting[:MAX_BATCH], self._waiting[MAX_BATCH:]
            live = [(r, f) for r, f in batch if not f.cancelled()]
            if live:
                await self._write_batch(live)

    async def _write_batch(self, live: list[tuple[HoldRequest, asyncio.Future]]) -> None:
        try:
            decisions = await self.store.reserve([r for r, _ in live], time.time())
        except Exception as e:
            self._store_failed(live, e)
            for hold_id, email in getattr(e, "placed", ()):  # holds of a commit whose answer was lost
                self._release(email, hold_id)
            return
        for (request, fut), decision in zip(live, decisions):
            if not fut.done():
                fut.set_result(decision)
            elif decision.hold_id is not None:  # the caller left: give the hold back
                self._release(request.email, decision.hold_id)

    def _release(self, email: str, hold_id: int) -> None:
        self.ledger.settle(Charge(email=email, day=date.today(), cost=0.0, hold_id=hold_id, kind="release"))

    async def close(self) -> None:
        await super().close()
        self._store_failed(self._waiting, StoreUnavailable("server is shutting down"))
        self._waiting = []


class MemoryAdmission(Admission):
    """Budgets in memory (aipipe.books): decided at once, but for a user's first request, which reads their spend."""

    in_memory = True

    def __init__(self, store: Store, ledger: Ledger, retry_seconds: float = 1.0) -> None:
        super().__init__(store, ledger, retry_seconds)
        self.books = Books()
        self._loads: list[tuple[HoldRequest, asyncio.Future]] = []  # users whose spend is not read yet

    def decide_now(self, request: HoldRequest) -> Decision | None:
        super().decide_now(request)
        if self.ledger.failing:  # charges are piling up unwritten: admit no more until they land
            raise StoreUnavailable("charges could not be written")
        return self.books.admit(request, time.time())  # None until the user's spend is read

    async def decide(self, request: HoldRequest) -> Decision:
        decision = self.decide_now(request)
        if decision is not None:
            return decision
        fut = asyncio.get_running_loop().create_future()
        self._loads.append((request, fut))
        if len(self._loads) == 1:
            self.ledger.between_writes(self._load)
        return await fut

    async def _load(self) -> None:
        """Read the spend of users seen for the first time, then decide their requests."""
        while self._loads:
            request, fut = self._loads.pop(0)
            if fut.done():
                continue
            if not self.books.ready(request):
                try:
                    daily = await self.store.daily_usage(request.email, request.since)
                except Exception as e:
                    self._store_failed([(request, fut)], e)
                    continue
                # between the ledger's writes: the charges still queued were not in the store when it was read
                self.books.load(request.email, request.since, daily, self.ledger.unwritten)
            if not fut.done():
                fut.set_result(self.books.admit(request, time.time()))  # ready now: never None

    def settled(self, charge: Charge) -> bool:
        self.books.settle(charge)
        charge.hold_id = None  # holds live here only, never in the store
        return charge.kind != "release"

    async def held(self, email: str, now: float) -> float:
        return self.books.held(email, now)

    def forget_spend(self, email: str | None = None) -> None:
        self.books.forget_spend(email)

    async def prune(self, now: float) -> None:
        self.books.prune(now)

    async def start(self) -> None:
        await super().start()
        await self.store.changed_elsewhere()  # the baseline later checks compare with
        self._tasks.append(asyncio.get_running_loop().create_task(self._watch_store()))

    async def _watch_store(self) -> None:
        """When another program (`aipipe set-cost`, say) wrote the file, read spend afresh."""
        while True:
            await asyncio.sleep(WATCH_SECONDS)
            try:
                if await self.store.changed_elsewhere():
                    self.books.forget_spend()
            except Exception as e:
                log.warning("checking the store for outside writes failed: %s", e)

    async def close(self) -> None:
        await super().close()
        self._store_failed(self._loads, StoreUnavailable("server is shutting down"))
        self._loads = []


def choose_admission(mode: str, store: Store, processes: int, spool_dir: str | None = None,
                     metrics=None) -> tuple[Ledger, Admission]:
    """The ledger and the admission for a server: budgets in memory when it is the only process using an SQLite
    file and `[storage] admission` is "auto"; in the store otherwise."""
    in_memory = mode == "auto" and processes == 1 and store.single_file
    # in memory nobody waits on a charge being written, so the writer gathers them for a while (aipipe.ledger)
    ledger = Ledger(store, spool_dir=spool_dir, metrics=metrics, linger=LINGER if in_memory else 0.0)
    return ledger, (MemoryAdmission if in_memory else StoreAdmission)(store, ledger)
