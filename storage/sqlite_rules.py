"""Budget rules set at runtime and the audit trail, as transactions run on the SQLite store's connection thread."""
from __future__ import annotations

import json
import sqlite3

from .base import budget_detail, rule_row

RULE_COLUMNS = "match, limit_usd, days, period, models, updated, updated_by"


def read_rules(conn: sqlite3.Connection) -> tuple[int, list[dict]]:
    conn.execute("BEGIN")  # a deferred read transaction: the version and the rules from one snapshot
    try:
        version = conn.execute("SELECT version FROM rules_version").fetchone()[0]
        rules = [rule_row(*r) for r in conn.execute(f"SELECT {RULE_COLUMNS} FROM budget_rules ORDER BY match")]
    finally:
        conn.execute("COMMIT")
    return int(version), rules


def _bump_version(conn: sqlite3.Connection) -> int:
    return conn.execute("UPDATE rules_version SET version = version + 1 WHERE id = 1 RETURNING version").fetchone()[0]


def _rule(conn: sqlite3.Connection, match: str) -> dict | None:
    row = conn.execute(f"SELECT {RULE_COLUMNS} FROM budget_rules WHERE match = ?", (match,)).fetchone()
    return rule_row(*row) if row else None


def set_rule(conn: sqlite3.Connection, rule: dict, admin: str, now: float) -> int:
    before = _rule(conn, rule["match"])
    conn.execute(f"""INSERT INTO budget_rules ({RULE_COLUMNS}) VALUES (?,?,?,?,?,?,?)
                     ON CONFLICT (match) DO UPDATE SET limit_usd = excluded.limit_usd, days = excluded.days,
                     period = excluded.period, models = excluded.models, updated = excluded.updated,
                     updated_by = excluded.updated_by""",
                 (rule["match"], rule["limit"], rule["days"], rule["period"], json.dumps(list(rule["models"])), now, admin))
    write_audit(conn, admin, "budget.set", rule["match"], {**budget_detail(rule), "previous": budget_detail(before)}, now)
    return _bump_version(conn)


def remove_rule(conn: sqlite3.Connection, match: str, admin: str, now: float) -> dict | None:
    before = _rule(conn, match)
    if before is None:
        return None
    conn.execute("DELETE FROM budget_rules WHERE match = ?", (match,))
    write_audit(conn, admin, "budget.remove", match, {"removed": budget_detail(before)}, now)
    _bump_version(conn)
    return before


def write_audit(conn: sqlite3.Connection, admin: str, action: str, target: str, detail: dict, now: float) -> None:
    conn.execute("INSERT INTO audit (ts, admin, action, target, detail) VALUES (?,?,?,?,?)",
                 (now, admin, action, target, json.dumps(detail)))
