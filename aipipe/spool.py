"""A store's spool: the folder where charges wait that could not be written, and the charges it refused.

Each process appends to a file of its own (`unsettled-<pid>-<random>.jsonl`); at start a process replays every
such file of its store that no other process holds locked, and deletes each once its charges are committed.
Charges carry their ids, so replaying a file twice bills it once. A charge the store refuses (bad data, not an
outage) goes to `rejected.jsonl` beside them, for an operator to look at. The folder belongs to the store:
`<file>.spool` beside an SQLite file; for PostgreSQL a folder named after the database the URL names.
"""
from __future__ import annotations

import fcntl
import glob
import hashlib
import json
import logging
import os
import secrets
from dataclasses import asdict, fields
from datetime import date
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from .storage import Charge, RowRefused, sqlite_path, url_scheme

log = logging.getLogger("aipipe.ledger")
SPOOL_FILES = "unsettled-*.jsonl"  # in the spool folder: charges to replay (one file per process that spooled)
REJECTED = "rejected.jsonl"  # in the spool folder: charges the store refused, for an operator to look at
CHARGE_FIELDS = frozenset(f.name for f in fields(Charge))
# URL parameters that do not change which database a PostgreSQL URL names
NOT_IDENTITY = frozenset({"connect_timeout", "command_timeout", "application_name"})


def spool_dir(store_url: str, state_dir: str | None = None) -> str | None:
    """The folder for a store's unwritten charges: `<file>.spool` beside an SQLite file (None in memory); for
    PostgreSQL `aipipe-spool-<hash of the URL without password>` in state_dir, $STATE_DIRECTORY or the working folder."""
    if url_scheme(store_url) == "sqlite":
        path = sqlite_path(store_url)
        return None if path == ":memory:" else os.path.abspath(path) + ".spool"
    parts = urlsplit(store_url)
    host = f"{parts.username or ''}@{(parts.hostname or '').lower()}:{parts.port or 5432}"
    query = urlencode(sorted((k, v) for k, v in parse_qsl(parts.query) if k not in NOT_IDENTITY and k != "password"))
    identity = urlunsplit(("postgresql", host, parts.path, query, ""))
    base = state_dir or os.environ.get("STATE_DIRECTORY", "").split(":")[0] or os.getcwd()
    return os.path.join(base, "aipipe-spool-" + hashlib.sha256(identity.encode()).hexdigest()[:16])


class Spool:
    """One store's spool folder as this process uses it (or a single file, for tests and tools)."""

    def __init__(self, folder: str | None = None, path: str | None = None, metrics=None) -> None:
        self.folder, self.metrics = folder, metrics
        self.path = path or (folder and os.path.join(
            folder, SPOOL_FILES.replace("*", f"{os.getpid()}-{secrets.token_hex(4)}")))
        self.rejected_path = self.path and os.path.join(os.path.dirname(self.path), REJECTED)
        self._held: dict[str, object] = {}  # files being replayed: path -> open file holding its flock

    def reject(self, charge: Charge, error: RowRefused) -> None:
        """Append a charge the store refuses to the rejected file, so that the charges after it are written."""
        where = self.rejected_path
        try:
            if where:
                append_lines(where, [spool_line(charge, error=str(error))], self._held)
        except OSError as e:
            log.error("could not append to %s: %s", where, e)
            where = None
        # the error's text can quote the row (a model name is the caller's text): the file has it, the log has its kind
        kind = type(error.__cause__ or error).__name__
        log.error("charge %s for %s (cost %r) refused by the store (%s): set aside in %s", charge.charge_id,
                  charge.email, charge.cost, kind, where or f"this line (no spool folder): {spool_line(charge)}")

    def write(self, charges: list[Charge]) -> bool:
        """Append charges to this process's spool file; whether they are safely there."""
        if not self.path:
            log.error("%d charges could not be written and there is no spool folder", len(charges))
            return False
        try:
            append_lines(self.path, [spool_line(c) for c in charges], self._held)
        except OSError as e:
            log.error("could not spool %d unwritten charges to %s: %s", len(charges), self.path, e)
            return False
        log.warning("spooled %d unwritten charges to %s; they are replayed at next start", len(charges), self.path)
        if self.metrics is not None:
            self.metrics.spooled.inc(len(charges))
        return True

    def read_all(self) -> list[Charge]:
        """The charges of every spool file of this store that no other process holds; each file stays locked."""
        if self.folder:
            paths = sorted(glob.glob(os.path.join(glob.escape(self.folder), SPOOL_FILES)))
        else:
            paths = [self.path] if self.path and os.path.exists(self.path) else []
        charges: list[Charge] = []
        for path in paths:
            f = lock_for_replay(path)
            if f is None:
                continue  # being written or replayed by another process: left to it
            self._held[path] = f
            f.seek(0)
            found = [c for c in (self._read_line(line, path) for line in f if line.strip()) if c is not None]
            log.warning("replaying %d spooled charges from %s", len(found), path)
            charges += found
        return charges

    def _read_line(self, line: str, path: str) -> Charge | None:
        """A spool line as a Charge; one that cannot be read goes to the rejected file."""
        try:
            return spooled_charge(line)
        except (ValueError, TypeError, KeyError) as e:
            log.error("unreadable line in %s (%s): set aside in %s", path, type(e).__name__, self.rejected_path)
            try:
                append_lines(self.rejected_path, [json.dumps({"line": line.rstrip("\n"), "error": str(e)})], self._held)
            except OSError as oe:
                log.error("could not append to %s: %s", self.rejected_path, oe)
            return None

    def release(self, delete: bool, keep: str | None = None) -> None:
        """Unlock the spool files being replayed, deleting them (but keep) first if delete: their charges are safe."""
        held, self._held = self._held, {}
        for path, f in held.items():
            if delete and path != keep:
                try:
                    os.unlink(path)  # before unlocking: a process that then takes the lock finds no file
                except OSError as e:
                    log.error("could not delete the replayed spool file %s: %s", path, e)
            f.close()


def spool_line(c: Charge, **extra) -> str:
    """A charge as one JSON line of a spool (or rejected) file."""
    row = asdict(c)
    row["day"] = c.day.isoformat() if isinstance(c.day, date) else c.day
    return json.dumps({**row, **extra}, default=repr)


def spooled_charge(line: str) -> Charge:
    """A spool line as a Charge; a line without an id (an older version's) gets one made from its text, so
    replaying it twice still bills it once."""
    row = json.loads(line)
    charge = Charge(**{k: v for k, v in row.items() if k in CHARGE_FIELDS and k != "day"},
                    day=date.fromisoformat(row["day"]))
    if not charge.charge_id:
        charge.charge_id = "spool-" + hashlib.sha256(line.strip().encode()).hexdigest()[:32]
    return charge


def lock_for_replay(path: str):
    """The file opened and exclusively locked, or None if another process holds it or it is gone."""
    try:
        f = os.fdopen(os.open(path, os.O_RDWR | os.O_APPEND), "a+", encoding="utf-8")  # not created if gone
    except OSError:
        return None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        return None
    if os.fstat(f.fileno()).st_nlink == 0:  # replayed and deleted by another process meanwhile
        f.close()
        return None
    return f


def append_lines(path: str, lines: list[str], held: dict) -> None:
    """Append whole lines under an exclusive flock (through the open file if this process holds it) and fsync."""
    data = "".join(line + "\n" for line in lines)
    f = held.get(path)
    if f is not None:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
        return
    os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        view = memoryview(data.encode("utf-8"))
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


