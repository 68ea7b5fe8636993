"""The one writer between request handlers and the store.

Calls hand in charges; a single task turns everything that piled up into one transaction. Between
its writes it runs the admission's database work (aipipe.admission: Ledger.between_writes), so a
call that finished counts against the very next admission, and a user's spend is never read while
their charges are half written.

Every charge gets an id when queued (a random prefix per ledger and a counter) and the store skips
ids it already has, so writing a batch again (retried after the answer to its commit was lost, or a
spool file replayed twice) bills it once. A charge is never silently dropped:
- store unavailable: it stays queued and is retried every retry_seconds until the store is back;
- its row refused (RowRefused: data the store will not take even after cleaning): the batch is
  halved until that row is alone, the others are written, and it is appended to `rejected.jsonl`
  in the spool folder;
- the writer task fails on anything else: logged with its traceback and restarted, charges kept;
- at shutdown, what could not be written goes to this process's own file in the store's spool
  folder (aipipe.spool). At start a process replays every file there that no other process holds
  locked, and deletes each once its charges are committed.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import math
import secrets
import time

from .storage import Charge, RowRefused, Store, StoreUnavailable
from .storage.base import safe_cost
from .spool import Spool

log = logging.getLogger("aipipe.ledger")
MAX_BATCH = 512
# With budgets in memory, seconds charges wait to be written with the ones that follow: fewer, larger
# transactions cost less CPU per call (SQLite's per-commit work and the hand-offs to aiosqlite's thread;
# docs/performance.md). A process killed outright loses at most this much of charges.
LINGER = 0.1
INF = math.inf


class Ledger:
    """Batches charges into few transactions, and runs admission's database work between them."""

    def __init__(self, store: Store, spool_dir: str | None = None, retry_seconds: float = 1.0,
                 spool_path: str | None = None, metrics=None, linger: float = 0.0):
        """spool_dir: the store's spool folder (see spool_dir()); spool_path: a single file instead, replayed and
        written to; metrics: an aipipe.metrics.Metrics that counts store errors and spooled charges; linger:
        seconds to gather charges nobody waits for into one transaction."""
        self.store = store
        self.metrics = metrics
        self.linger = linger
        self._jobs: list = []  # coroutine functions to run between writes (between_writes)
        self.spool = Spool(spool_dir, spool_path, metrics)
        self.retry_seconds = retry_seconds
        self._id_prefix = secrets.token_hex(8) + "-"  # per ledger (so per process: made after any fork)
        self._next_id = itertools.count(1).__next__
        self._settles: list[Charge] = []
        # Who waits for charges to be written: [charges queued so far when last extended, future] per group of
        # charges queued between two writes (one future per write, not per charge), oldest first.
        self._marks: list[list] = []
        self._open_mark: list | None = None  # the group settle() adds to; closed when the writer takes a batch
        self._queued = 0  # charges ever queued (replayed ones included)
        self._written = 0  # of those, committed to the store
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake = asyncio.Event()
        self._hurry = asyncio.Event()  # set when someone waits on the writer: stop gathering charges
        self._task: asyncio.Task | None = None
        self._closing = False
        self._closed = False  # close() has spooled what was left: later charges go to the spool directly
        self._settle_after = 0.0  # monotonic time before which a failed settle is not retried
        self._settle_failing = False  # the last attempt to write charges failed

    def start(self) -> None:
        """Start the writer task on the running loop, replaying any spooled charges first."""
        self._loop = asyncio.get_running_loop()
        replayed = self.spool.read_all()
        if replayed:  # written first: charges queued before start() (none, in the server) wait for them too
            self._settles[:0] = replayed
            self._queued += len(replayed)
            for mark in self._marks:
                mark[0] += len(replayed)
            done = self._loop.create_future()  # the spool files go once what they held is committed
            self._marks.insert(0, [len(replayed), done])
            done.add_done_callback(lambda _: self.spool.release(delete=True))
        else:
            self.spool.release(delete=True)  # files with nothing to replay
        self._start_writer()
        if self._settles:
            self._wake.set()

    def _start_writer(self) -> None:
        self._task = self._loop.create_task(self._run())
        self._task.add_done_callback(self._writer_ended)

    def _writer_ended(self, task: asyncio.Task) -> None:
        """Log a writer that failed, at once, and start another: what it held is still queued."""
        if task.cancelled() or task.exception() is None:
            return
        log.error("the ledger writer failed with %d charges queued (kept); restarting it", len(self._settles),
                  exc_info=task.exception())
        if not self._closing:
            self._loop.call_later(self.retry_seconds, self._restart_writer)

    def _restart_writer(self) -> None:
        if not self._closing and self._task.done():
            self._start_writer()
            self._wake.set()

    def between_writes(self, job) -> None:
        """Run `await job()` on the writer task after it next writes the charges queued (or fails to), at once
        rather than after the linger: nothing else reads or writes through the ledger while it runs."""
        self._jobs.append(job)
        self._wake.set()
        self._hurry.set()

    @property
    def unwritten(self) -> list[Charge]:
        """Charges queued and not yet written (complete while a between_writes job runs)."""
        return self._settles

    def settle(self, charge: Charge) -> asyncio.Future:
        """Queue a charge; the returned future resolves once it is committed (awaiting it is optional).

        Charges queued between two writes share one future: to wait for it with a timeout, wrap it in
        asyncio.shield(), or the timeout cancels it for the others too."""
        if not 0.0 <= charge.cost < INF:  # NaN, infinite or negative: a bad price must not lower anyone's spend
            charge.cost = safe_cost(charge)
        if not charge.charge_id:
            charge.charge_id = f"{self._id_prefix}{self._next_id()}"
        if self._closed:  # a call that ended after close() (a shutdown's last stragglers): straight to the spool
            fut = self._future()
            fut.set_result(self.spool.write([charge]))
            return fut
        self._settles.append(charge)
        self._queued += 1
        self._wake.set()
        return self._mark()

    def _future(self) -> asyncio.Future:
        """A future on the writer's loop (asked for once, at start: every get_running_loop() costs a getpid())."""
        return (self._loop or asyncio.get_running_loop()).create_future()

    def _mark(self) -> asyncio.Future:
        """The future of the open group of charges, now also covering the ones queued last."""
        mark = self._open_mark
        if mark is None:
            mark = self._open_mark = [0, self._future()]
            self._marks.append(mark)
        mark[0] = self._queued
        return mark[1]

    async def flush(self, timeout: float = 10.0) -> None:
        """Wait until every charge queued so far is written; StoreUnavailable if that takes longer than timeout."""
        if self._written >= self._queued:
            return
        # A future of our own (a timeout cancels only it), after the open group's, which is closed so that
        # the marks stay in order of the charges they wait for.
        self._open_mark = None
        done = self._future()
        self._marks.append([self._queued, done])
        self._wake.set()
        self._hurry.set()
        try:
            await asyncio.wait_for(done, timeout)
        except asyncio.TimeoutError:
            raise StoreUnavailable("pending charges could not be written") from None

    @property
    def pending(self) -> int:
        """Charges not yet committed."""
        return len(self._settles)

    @property
    def failing(self) -> bool:
        """Whether the last attempt to write charges failed (they wait, queued, for the store)."""
        return self._settle_failing

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            if self.linger and not (self._closing or self._jobs or self._hurry.is_set()) and len(self._settles) < MAX_BATCH:
                # nobody waits on these writes, so gather more into one transaction; a flush, or a job (a user's
                # first request, waiting for its spend to be read) cuts the wait short (or skips it)
                timer = asyncio.get_running_loop().call_later(self.linger, self._hurry.set)
                await self._hurry.wait()
                timer.cancel()
            self._hurry.clear()  # only now: a hurry asked for before the linger began counts
            self._wake.clear()
            # admissions waiting: try the charges now, retry due or not, since the holds they release decide them
            due = self._closing or bool(self._jobs) or time.monotonic() >= self._settle_after
            written = await self._write_settles() if due else False
            if due:
                self._settle_failing = not written
                if written:  # back: the next charges need not wait for a retry that was due later
                    self._settle_after = 0.0
            jobs, self._jobs = self._jobs, []
            for job in jobs:
                try:
                    await job()
                except Exception:  # a job answers its own callers; one that failed must not stop the writer
                    log.exception("ledger job %r failed", job)
            if self._closing and (not written or not self._settles):
                return  # at shutdown, what the store will not take is spooled by close()
            if due and not written:  # store down: charges wait for one retry a while later, not one per request
                self._settle_after = time.monotonic() + self.retry_seconds
                asyncio.get_running_loop().call_later(self.retry_seconds, self._wake.set)

    async def _write_settles(self) -> bool:
        """Write queued charges; False if the store is unavailable (they stay queued)."""
        while self._settles:
            self._open_mark = None  # charges queued from now on wait for the next pass
            batch = self._settles[:MAX_BATCH]
            try:
                await self._write_batch(batch)
            except StoreUnavailable as e:  # keep the charges and try again: money is never dropped
                log.error("could not write %d charges (%s); retrying in %.0fs", len(batch), e, self.retry_seconds)
                if self.metrics is not None:
                    self.metrics.store_errors.inc()
                return False
            del self._settles[:len(batch)]
            self._written += len(batch)
            marks = self._marks
            while marks and marks[0][0] <= self._written:
                done = marks.pop(0)[1]
                if not done.done():
                    done.set_result(None)
        return True

    async def _write_batch(self, batch: list[Charge]) -> None:
        """Write a batch; when the store refuses a row, halve it until that row is alone and set it aside."""
        try:
            await self.store.settle(batch)
        except RowRefused as e:
            if len(batch) == 1:
                self.spool.reject(batch[0], e)
                return
            half = len(batch) // 2  # halves of a refused batch: nothing of it was written
            await self._write_batch(batch[:half])
            await self._write_batch(batch[half:])

    async def close(self, timeout: float = 10.0) -> None:
        """Write what is queued (waiting at most timeout), spool the rest, and stop."""
        self._closing = True
        self._wake.set()
        self._hurry.set()
        if self._loop is not None:
            if self._task is None or self._task.done():
                self._start_writer()  # the writer failed: one more try before spooling
            try:
                await asyncio.wait_for(asyncio.shield(self._task), timeout)
            except asyncio.TimeoutError:
                self._task.cancel()
            except Exception:
                pass  # logged as the writer ended
        spooled = not self._settles or self.spool.write(self._settles)
        self._settles = []
        self._closed = True
        self.spool.release(delete=spooled, keep=self.spool.path)  # what they still held is in our own file now
