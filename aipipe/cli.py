"""aipipe serve | migrate | token | usage | set-cost | check-config"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import secrets
import sys
import time
from datetime import date

from dotenv import dotenv_values, set_key

from .auth import MIN_SECRET_BYTES, mint_token
from .budget import today_utc, window_start
from .config import Config, ConfigError, example_settings_toml, load_config
from .logs import setup_logging
from .storage import StoreConfigError, open_store

log = logging.getLogger("aipipe")


def load_env(path: str | None) -> dict[str, str]:
    """The environment, with the env file's values filling in what the environment does not set."""
    env = dict(os.environ)
    if path and os.path.exists(path):
        for k, v in dotenv_values(path).items():
            if v is not None and k not in env:
                env[k] = v
    return env


def ensure_secret(env: dict[str, str], env_file: str) -> None:
    """Make sure AIPIPE_SECRET is set and strong; generate and save one on first run."""
    secret = env.get("AIPIPE_SECRET", "")
    if not secret:
        secret = secrets.token_urlsafe(48)
        if not os.path.exists(env_file):
            os.close(os.open(env_file, os.O_WRONLY | os.O_CREAT, 0o600))
        set_key(env_file, "AIPIPE_SECRET", secret, quote_mode="never")
        os.chmod(env_file, 0o600)
        print(f"aipipe: generated a new AIPIPE_SECRET and saved it to {env_file} (mode 0600)", file=sys.stderr)
        env["AIPIPE_SECRET"] = secret
    if len(secret.encode()) < MIN_SECRET_BYTES:
        raise ConfigError(f"AIPIPE_SECRET is too short: use at least {MIN_SECRET_BYTES} bytes (e.g. `openssl rand -hex 32`)")


def _config(args, need_secret: bool = False) -> Config:
    env = load_env(args.env_file)
    if need_secret:
        ensure_secret(env, args.env_file or ".env")
    return load_config(args.config, env)


def cmd_serve(args) -> int:
    """Start the server."""
    from .server import run

    config = _config(args, need_secret=True)
    host = args.host or config.get("server.host")
    port = args.port if args.port is not None else config.get("server.port")
    processes = args.processes if args.processes is not None else config.get("server.processes")
    run(config, host, port, processes)
    return 0


def _with_store(config: Config, work):
    async def main():
        store = await open_store(config.get("storage.url"), config.get("storage.pool_min"), config.get("storage.pool_max"))
        try:
            return await work(store)
        finally:
            await store.close()
    return asyncio.run(main())


def cmd_migrate(args) -> int:
    """Create or upgrade the database schema."""
    config = _config(args)

    async def noop(store):
        return None
    _with_store(config, noop)
    print(f"aipipe: schema is current in {config.get('storage.url').split('@')[-1]}")
    return 0


def cmd_token(args) -> int:
    """Print a token for an email."""
    config = _config(args, need_secret=True)
    email = args.email.strip().lower()
    print(mint_token(email, config.secret, config.salt_for(email), args.expires_in))
    return 0


def cmd_usage(args) -> int:
    """Print usage as JSON: one email's window, or everyone's daily totals."""
    config = _config(args)

    async def work(store):
        if args.email:
            budget = config.budget_for(args.email)
            since = window_start(budget, today_utc())
            rows = await store.daily_usage(args.email.lower(), since)
            return {"email": args.email.lower(), "limit": budget.limit, "cost": sum(c for _, c in rows),
                    "usage": [{"date": d, "cost": c} for d, c in rows]}
        return {"data": await store.all_usage(limit=args.limit)}
    print(json.dumps(_with_store(config, work), indent=2))
    return 0


def cmd_set_cost(args) -> int:
    """Overwrite one day's cost for an email."""
    config = _config(args)
    day = date.fromisoformat(args.date)
    if args.cost < 0:
        raise ConfigError("cost must not be negative")

    async def work(store):
        await store.set_cost(args.email.lower(), day, args.cost, time.time())
    _with_store(config, work)
    print(f"Cost for {args.email.lower()} on {day.isoformat()} set to {args.cost}")
    return 0


def cmd_check_config(args) -> int:
    """Validate a config file (or print every setting with its default)."""
    if args.defaults:
        print(example_settings_toml(), end="")
        return 0
    config = _config(args)
    print(f"aipipe: {args.config or 'built-in defaults'} is valid; "
          f"{len(config.budgets)} budget rules, {len(config.admins)} admins, storage {config.get('storage.url').split('@')[-1]}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    parser = argparse.ArgumentParser(prog="aipipe", description="Self-hosted LLM API gateway")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name, func, help_text):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--config", help="TOML config file (default: built-in defaults)")
        p.add_argument("--env-file", default=".env", help="file of KEY=value secrets (default .env)")
        p.set_defaults(func=func)
        return p

    p = add("serve", cmd_serve, "start the server")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--processes", "--workers", type=int, dest="processes", help="worker processes (default 1)")
    add("migrate", cmd_migrate, "create or upgrade the database schema")
    p = add("token", cmd_token, "print an AI Pipe token for an email")
    p.add_argument("email")
    p.add_argument("--expires-in", type=float, help="seconds until the token expires")
    p = add("usage", cmd_usage, "print usage as JSON")
    p.add_argument("--email")
    p.add_argument("--limit", type=int, default=100)
    p = add("set-cost", cmd_set_cost, "overwrite a day's cost for an email")
    p.add_argument("email")
    p.add_argument("date", help="YYYY-MM-DD")
    p.add_argument("cost", type=float)
    p = add("check-config", cmd_check_config, "validate a config file")
    p.add_argument("--defaults", action="store_true", help="print every setting with its default")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `aipipe` command."""
    setup_logging()
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, StoreConfigError, ValueError) as e:
        print(f"aipipe: {e}", file=sys.stderr)
        return 1
