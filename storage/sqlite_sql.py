"""SQLite's schema (its migrations, in order) and the statements the store runs on it."""
from __future__ import annotations

from .base import users_summary_tail

MIGRATIONS = (
    """
    CREATE TABLE usage (email TEXT NOT NULL, date TEXT NOT NULL, cost REAL NOT NULL DEFAULT 0,
                        PRIMARY KEY (email, date));
    CREATE TABLE ledger (id INTEGER PRIMARY KEY AUTOINCREMENT, ts REAL NOT NULL, email TEXT NOT NULL,
        date TEXT NOT NULL, kind TEXT NOT NULL, provider TEXT NOT NULL DEFAULT '', model TEXT NOT NULL DEFAULT '',
        input_tokens INTEGER NOT NULL DEFAULT 0, output_tokens INTEGER NOT NULL DEFAULT 0,
        cost REAL NOT NULL, status INTEGER NOT NULL DEFAULT 0, duration_ms REAL NOT NULL DEFAULT 0,
        streamed INTEGER NOT NULL DEFAULT 0, aborted INTEGER NOT NULL DEFAULT 0);
    CREATE INDEX ledger_email_date ON ledger (email, date);
    CREATE TABLE holds (id INTEGER PRIMARY KEY, email TEXT NOT NULL, amount REAL NOT NULL,
        created REAL NOT NULL, expires REAL NOT NULL, released INTEGER NOT NULL DEFAULT 0);
    CREATE INDEX holds_email ON holds (email, created);
    """,
    # admissions sum the open holds of a user: keep that read small however many holds were ever placed
    "CREATE INDEX holds_open ON holds (email) WHERE released = 0",
    # a settle retried after its commit landed (or a spool replayed twice) must not bill twice
    """ALTER TABLE ledger ADD COLUMN charge_id TEXT;
    CREATE UNIQUE INDEX ledger_charge_id ON ledger (charge_id)""",
    # budget rules set by admins at runtime, the version every process compares with its copy, and the audit trail
    """CREATE TABLE budget_rules (match TEXT PRIMARY KEY, limit_usd REAL NOT NULL, days INTEGER NOT NULL DEFAULT 1,
        period TEXT, models TEXT NOT NULL DEFAULT '[]', updated REAL NOT NULL, updated_by TEXT NOT NULL);
    CREATE TABLE rules_version (id INTEGER PRIMARY KEY CHECK (id = 1), version INTEGER NOT NULL);
    INSERT INTO rules_version (id, version) VALUES (1, 0);
    CREATE TABLE audit (id INTEGER PRIMARY KEY AUTOINCREMENT, ts REAL NOT NULL, admin TEXT NOT NULL,
        action TEXT NOT NULL, target TEXT NOT NULL DEFAULT '', detail TEXT NOT NULL DEFAULT '{}')""",
)

LEDGER_INSERT = """INSERT INTO ledger (charge_id, ts, email, date, kind, provider, model, input_tokens, output_tokens,
    cost, status, duration_ms, streamed, aborted) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)"""
ADD_COST = """INSERT INTO usage (email, date, cost) VALUES (?, ?, ?)
    ON CONFLICT (email, date) DO UPDATE SET cost = cost + excluded.cost"""
# Per provider and model, with admins' corrections as a row of their own, so the rows add up to the spend.
BY_MODEL = """SELECT CASE kind WHEN 'adjust' THEN ?1 ELSE provider END AS p, CASE kind WHEN 'adjust' THEN ?2 ELSE model END AS m,
        SUM(kind = 'request'), SUM(input_tokens), SUM(output_tokens), SUM(cost) FROM ledger
    WHERE email = ?3 AND date >= ?4 AND kind IN ('request', 'adjust') GROUP BY p, m ORDER BY SUM(cost) DESC, p, m"""
# Everyone with spend or requests in their own budget window. ?1: the rules as JSON [[match, first day, limit]],
# ?2: the earliest first day of any rule, ?3: the first day when no rule applies, ?4: part of an email. A domain is
# what follows the last "@" (rtrim strips every character but "@" off the end), as aipipe.config.budget_for reads it.
USERS = """WITH rules AS (SELECT json_extract(value, '$[0]') AS match, json_extract(value, '$[1]') AS since,
            json_extract(value, '$[2]') AS lim FROM json_each(?1)),
    days AS (SELECT email, date, cost FROM usage WHERE date >= ?2),
    calls AS (SELECT email, date, ts FROM ledger WHERE kind = 'request' AND date >= ?2),
    people AS (SELECT email, lower(email) AS low FROM (SELECT email FROM days UNION SELECT email FROM calls)),
    windows AS (SELECT p.email, COALESCE(e.since, d.since, s.since, ?3) AS since, COALESCE(e.lim, d.lim, s.lim, 0.0) AS lim
        FROM people p LEFT JOIN rules e ON e.match = p.low
        LEFT JOIN rules d ON d.match = '@' || substr(p.low, length(rtrim(p.low, replace(p.low, '@', ''))) + 1)
        LEFT JOIN rules s ON s.match = '*' WHERE instr(p.low, ?4) > 0),
"""  # the rest, alike on both backends:
USERS_TAIL, USER_ORDER = users_summary_tail("SUM(x.cost)", "MAX")
USERS += USERS_TAIL
