"""Budget rules in force: the config file's [budget] merged with the rules admins set in the store at runtime.

A rule in the store overrides the file's rule for the same match ("user@x.com", "@x.com" or "*"). budget_for()
is a dictionary lookup, cheap enough for every request. Where admission happens in the store (several processes,
PostgreSQL) other processes and instances change rules too, so Gateway.admit calls sync() first: one single-row
read of the store's rules version, shared by every caller waiting at the same time, and the rules themselves only
when that version moved. A server keeping budgets in memory is the only user of its SQLite file, so it never needs
to look: a rule set through it is applied as it is written.
"""
from __future__ import annotations

import asyncio
import logging
import math
import re
import time
from types import MappingProxyType
from typing import Mapping

from .config import Budget, Config, ConfigError, _parse_budget, budget_for
from .errors import ApiError
from .storage import Store, StoreUnavailable

log = logging.getLogger("aipipe.rules")
MAX_LIMIT = 1e6  # USD: the most a rule may allow, as for a day's cost in /admin/cost
MAX_MODELS, MAX_PATTERN = 100, 256  # model patterns a rule may list, and characters in each
MATCH = re.compile(r"^(\*|@[^@\s]+|[^@\s]+@[^@\s]+)$")
RULE_KEYS = ("match", "limit", "days", "period", "models")


def parse_match(value) -> str:
    """A rule's match ("user@x.com", "@x.com" or "*"), lower-cased as budget_for compares; 400 otherwise."""
    if isinstance(value, str):
        value = value.strip().lower()
        if len(value) <= 320 and value.isprintable() and MATCH.match(value):
            return value
    raise ApiError(400, 'match must be an email address, "@domain" or "*"')


def parse_rule(data: dict) -> tuple[str, Budget]:
    """A POST /admin/budget body as (match, Budget), held to the config file's checks and a few more; 400 naming
    the field otherwise."""
    unknown = sorted(set(data) - set(RULE_KEYS))
    if unknown:
        raise ApiError(400, f"{unknown[0]} is not a budget key (use {', '.join(RULE_KEYS)})")
    for field in ("match", "limit"):
        if field not in data:
            raise ApiError(400, f"Missing field: {field}")
    match = parse_match(data["match"])
    if "days" in data and data.get("period") is not None:
        raise ApiError(400, "Give days or period, not both")
    try:
        budget = _parse_budget(match, {k: v for k, v in data.items() if k != "match"})
    except ConfigError as e:  # `budget."x".limit must ...`: the API names the field alone
        text, where = str(e), f'budget."{match}".'
        raise ApiError(400, text[len(where):] if text.startswith(where) else text) from None
    if not math.isfinite(budget.limit):
        raise ApiError(400, "limit must be a number of USD")
    if budget.limit > MAX_LIMIT:
        raise ApiError(400, f"limit must be at most {MAX_LIMIT:,.0f} USD")
    if len(budget.models) > MAX_MODELS or any(len(m) > MAX_PATTERN or not m.isprintable() for m in budget.models):
        raise ApiError(400, f"models must be at most {MAX_MODELS} patterns of at most {MAX_PATTERN} printable characters")
    return match, budget


def rule_terms(budget: Budget) -> dict:
    """A Budget as the API and the store spell it."""
    return {"limit": budget.limit, "days": budget.days, "period": budget.period, "models": list(budget.models)}


def match_order(match: str) -> tuple:
    """"*" first, then domains, then emails, each alphabetically: the order rules are looked up in, reversed."""
    return (0 if match == "*" else 1 if match.startswith("@") else 2, match)


class BudgetRules:
    """The file's rules merged with the store's; version changes whenever the rules in force change."""

    def __init__(self, config: Config, store: Store, watch: bool = True):
        """watch: whether other processes or instances may change the store's rules (so sync() reads)."""
        self.store, self.watch = store, watch
        self.version = 0
        self._file: Mapping[str, Budget] = config.budgets
        self._db: dict[str, dict] = {}  # match -> the store's row
        self._rules: Mapping[str, Budget] = config.budgets
        self._db_version: int | None = None  # the store's version self._db was read at
        self._started = self._finished = 0  # reads of the store's version begun and ended, in order
        self._reading: asyncio.Future | None = None
        self._failing = False

    def budget_for(self, email: str) -> Budget:
        """Budget by exact email, then @domain, then "*", then a zero limit."""
        return budget_for(self._rules, email)

    @property
    def rules(self) -> Mapping[str, Budget]:
        """Every rule in force, by match."""
        return self._rules

    def source_of(self, match: str) -> str | None:
        """"database", "config" or None: where the rule in force for exactly this match comes from."""
        return "database" if match in self._db else "config" if match in self._file else None

    def listing(self) -> list[dict]:
        """Every rule in force with its source; a database rule names the file's rule it overrides."""
        out = []
        for match in sorted(self._rules, key=match_order):
            rule = {"match": match, **rule_terms(self._rules[match]), "source": self.source_of(match)}
            row = self._db.get(match)
            if row is not None:
                rule.update(updated=row["updated"], updated_by=row["updated_by"],
                            overrides=rule_terms(self._file[match]) if match in self._file else None)
            out.append(rule)
        return out

    def use_config(self, config: Config) -> None:
        """Take a reloaded config file's rules (the store's still override them)."""
        self._file = config.budgets
        self._merge()

    async def load(self) -> None:
        """Read the store's rules (at start, and after this process changed them)."""
        version, rows = await self.store.budget_rules()
        self._db = {row["match"]: row for row in rows}
        self._db_version = version
        self._merge()

    async def sync(self) -> None:
        """Bring the store's rules up to date when another process or instance may have changed them.

        A read of the version that began before this call may have missed a rule committed just before it, so
        callers join only a read begun after they arrived: one read serves everyone who arrived while the one
        before it ran. When the store does not answer, the rules last read stay in force (admission itself then
        fails on the store)."""
        if not self.watch:
            return
        wanted = self._started + 1
        for _ in range(3):  # at most: the read under way, the one begun after it, and one spare
            if self._finished >= wanted:
                return
            if self._reading is None:
                self._started += 1
                self._reading = asyncio.ensure_future(self._read(self._started))
            await asyncio.shield(self._reading)

    async def _read(self, number: int) -> None:
        try:
            if await self.store.rules_version() != self._db_version:
                await self.load()
            self._failing = False
        except (StoreUnavailable, OSError) as e:
            if not self._failing:
                log.warning("could not read budget rules from the store, keeping those in force: %s", e)
            self._failing = True
        finally:
            self._finished, self._reading = number, None

    async def set(self, match: str, budget: Budget, admin_email: str) -> None:
        """Set (or replace) the store's rule for match, audited; in force for the next request everywhere."""
        await self.store.set_budget_rule({"match": match, **rule_terms(budget)}, admin_email, time.time())
        await self.load()

    async def remove(self, match: str, admin_email: str) -> dict | None:
        """Remove the store's rule for match, audited; the rule removed, or None when the store had none."""
        removed = await self.store.remove_budget_rule(match, admin_email, time.time())
        await self.load()
        return removed

    def _merge(self) -> None:
        rules = dict(self._file)
        for match, row in self._db.items():
            rules[match] = Budget(limit=row["limit"], days=row["days"], period=row["period"], models=tuple(row["models"]))
        if rules != dict(self._rules):
            self.version += 1
        self._rules = MappingProxyType(rules)
