"""PostgreSQL's schema (its migrations, in order) and the statements the store runs on it."""
from __future__ import annotations

import sys

from .base import users_summary_tail

LOCK_NAMESPACE = 0x41495050  # "AIPP": first key of the per-email advisory locks

MIGRATIONS = (
    """
    CREATE TABLE usage (email TEXT NOT NULL, date DATE NOT NULL, cost DOUBLE PRECISION NOT NULL DEFAULT 0,
                        PRIMARY KEY (email, date));
    CREATE TABLE ledger (id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY, ts DOUBLE PRECISION NOT NULL,
        email TEXT NOT NULL, date DATE NOT NULL, kind TEXT NOT NULL, provider TEXT NOT NULL DEFAULT '',
        model TEXT NOT NULL DEFAULT '', input_tokens BIGINT NOT NULL DEFAULT 0,
        output_tokens BIGINT NOT NULL DEFAULT 0, cost DOUBLE PRECISION NOT NULL, status INTEGER NOT NULL DEFAULT 0,
        duration_ms DOUBLE PRECISION NOT NULL DEFAULT 0, streamed BOOLEAN NOT NULL DEFAULT FALSE,
        aborted BOOLEAN NOT NULL DEFAULT FALSE);
    CREATE INDEX ledger_email_date ON ledger (email, date);
    CREATE TABLE holds (id BIGINT PRIMARY KEY, email TEXT NOT NULL, amount DOUBLE PRECISION NOT NULL,
        created DOUBLE PRECISION NOT NULL, expires DOUBLE PRECISION NOT NULL,
        released BOOLEAN NOT NULL DEFAULT FALSE);
    CREATE INDEX holds_email ON holds (email, created);
    CREATE INDEX holds_open ON holds (email) WHERE NOT released;
    """,
    # a settle retried after its commit landed (or a spool replayed twice) must not bill twice
    """ALTER TABLE ledger ADD COLUMN charge_id TEXT;
    CREATE UNIQUE INDEX ledger_charge_id ON ledger (charge_id);""",
    # budget rules set by admins at runtime, the version every instance compares with its copy, and the audit trail
    """CREATE TABLE budget_rules (match TEXT PRIMARY KEY, limit_usd DOUBLE PRECISION NOT NULL,
        days INTEGER NOT NULL DEFAULT 1, period TEXT, models TEXT NOT NULL DEFAULT '[]',
        updated DOUBLE PRECISION NOT NULL, updated_by TEXT NOT NULL);
    CREATE TABLE rules_version (id INTEGER PRIMARY KEY CHECK (id = 1), version BIGINT NOT NULL);
    INSERT INTO rules_version (id, version) VALUES (1, 0);
    CREATE TABLE audit (id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY, ts DOUBLE PRECISION NOT NULL,
        admin TEXT NOT NULL, action TEXT NOT NULL, target TEXT NOT NULL DEFAULT '', detail TEXT NOT NULL DEFAULT '{}');""",
)

LOCK_EMAILS = f"""SELECT pg_advisory_xact_lock({LOCK_NAMESPACE}, h)
    FROM (SELECT DISTINCT hashtext(e) AS h FROM unnest($1::text[]) AS e ORDER BY h) AS keys"""
# One statement, so settled spend and holds come from the same snapshot (taken after the locks).
READ_STATE = """
    SELECT 0 AS k, email, to_char(date, 'YYYY-MM-DD') AS day, cost AS amount, 0::float8 AS created, FALSE AS open
      FROM usage WHERE email = ANY($1::text[]) AND date >= $2::date
    UNION ALL
    SELECT 1, email, NULL, amount, created, (NOT released AND expires > $3::float8)
      FROM holds WHERE email = ANY($1::text[]) AND (NOT released OR created > $4::float8)
    ORDER BY k, created"""
INSERT_HOLDS = """INSERT INTO holds (id, email, amount, created, expires)
    SELECT * FROM unnest($1::bigint[], $2::text[], $3::float8[], $4::float8[], $5::float8[])"""
LEDGER_COLUMNS = ("charge_id, ts, email, date, kind, provider, model, input_tokens, output_tokens, cost, status, "
                  "duration_ms, streamed, aborted")
LEDGER_ARRAYS = ("$1::text[], $2::float8[], $3::text[], $4::date[], $5::text[], $6::text[], $7::text[], $8::bigint[], "
                 "$9::bigint[], $10::float8[], $11::int[], $12::float8[], $13::bool[], $14::bool[]")
INSERT_LEDGER = f"INSERT INTO ledger ({LEDGER_COLUMNS}) SELECT * FROM unnest({LEDGER_ARRAYS})"
# A whole settle batch in one statement (so one round trip, and atomic on its own): ledger rows,
# daily totals and hold releases. Only the rows inserted (charge ids not already there) reach the
# totals, which are grouped (ON CONFLICT may touch a row only once per statement) and ordered (two
# instances settling the same users lock rows in the same order). Releasing a hold twice changes nothing.
# A release is an upsert on the hold's id: for an admission whose COMMIT lost its answer, it waits for
# that transaction if it is still open and marks the row released whether the commit landed or not (a
# plain UPDATE would pass over a row not yet visible, leaving a hold counted as a call in flight). A row
# it has to write (the admission did not commit, or its hold was pruned) is dated 0: no rate window holds
# it, and the next prune drops it. How long it can wait is bounded by idle_in_transaction_session_timeout.
SETTLE = f"""WITH ledger_rows AS (INSERT INTO ledger ({LEDGER_COLUMNS}) SELECT * FROM unnest({LEDGER_ARRAYS})
        ON CONFLICT (charge_id) DO NOTHING RETURNING email, date, cost),
    totals AS (INSERT INTO usage (email, date, cost)
        SELECT email, date, SUM(cost) FROM ledger_rows WHERE cost <> 0
        GROUP BY email, date ORDER BY email, date
        ON CONFLICT (email, date) DO UPDATE SET cost = usage.cost + excluded.cost),
    released AS (INSERT INTO holds (id, email, amount, created, expires, released)
        SELECT id, email, 0, 0, 0, TRUE FROM unnest($15::bigint[], $16::text[]) AS r (id, email)
        ON CONFLICT (id) DO UPDATE SET released = TRUE)
    SELECT 1"""
PRUNE_HOLDS = """DELETE FROM holds WHERE id IN (
    SELECT id FROM holds WHERE created < $1::float8 AND (released OR expires < $2::float8)
    ORDER BY id FOR UPDATE SKIP LOCKED)"""
MAX_FLOAT = sys.float_info.max


def money_sum(column: str) -> str:
    """SQL summing costs within the largest float: PostgreSQL's float8 sum fails with an overflow error where
    SQLite's reaches infinity (which the handlers read as the largest float)."""
    return f"GREATEST(LEAST(SUM({column}::numeric), {MAX_FLOAT!r}), {-MAX_FLOAT!r})::float8"


# Per provider and model, with admins' corrections as a row of their own, so the rows add up to the spend.
BY_MODEL = f"""SELECT CASE kind WHEN 'adjust' THEN $1 ELSE provider END AS p, CASE kind WHEN 'adjust' THEN $2 ELSE model END AS m,
        COUNT(*) FILTER (WHERE kind = 'request'), SUM(input_tokens), SUM(output_tokens), {money_sum("cost")} AS total
    FROM ledger WHERE email = $3 AND date >= $4 AND kind IN ('request', 'adjust') GROUP BY p, m
    ORDER BY total DESC, p, m"""
# Everyone with spend or requests in their own budget window. $1-$3: the rules (match, first day, limit), $4: the
# earliest first day of any rule, $5: the first day when no rule applies, $6: part of an email. A domain is what
# follows the last "@", as aipipe.config.budget_for reads it.
USERS = """WITH rules AS (SELECT * FROM unnest($1::text[], $2::date[], $3::float8[]) AS r(match, since, lim)),
    days AS (SELECT email, date, cost FROM usage WHERE date >= $4::date),
    calls AS (SELECT email, date, ts FROM ledger WHERE kind = 'request' AND date >= $4::date),
    people AS (SELECT email, lower(email) AS low FROM (SELECT email FROM days UNION SELECT email FROM calls) AS e),
    windows AS (SELECT p.email, COALESCE(e.since, d.since, s.since, $5::date) AS since,
            COALESCE(e.lim, d.lim, s.lim, 0.0) AS lim
        FROM people p LEFT JOIN rules e ON e.match = p.low
        LEFT JOIN rules d ON d.match = '@' || substring(p.low from '[^@]*$')
        LEFT JOIN rules s ON s.match = '*' WHERE strpos(p.low, $6::text) > 0),
"""  # the rest, alike on both backends:
USERS_TAIL, USER_ORDER = users_summary_tail(money_sum("x.cost"), "GREATEST")
USERS += USERS_TAIL
RULE_COLUMNS = "match, limit_usd, days, period, models, updated, updated_by"
BUMP_VERSION = "UPDATE rules_version SET version = version + 1 WHERE id = 1 RETURNING version"
INSERT_AUDIT = "INSERT INTO audit (ts, admin, action, target, detail) VALUES ($1, $2, $3, $4, $5)"
