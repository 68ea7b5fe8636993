"""aipipe serve | migrate | token | usage | set-cost | check-config | backup | reload | systemd-unit"""
from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import logging
import math
import os
import secrets
import signal
import sqlite3
import sys
import time
from datetime import date

from dotenv import dotenv_values, set_key

from .auth import MIN_SECRET_BYTES, mint_token
from .budget import today_utc, window_start
from .rules import BudgetRules
from . import logs, systemd
from .config import KEY_ENV, Config, ConfigError, example_settings_toml, load_config
from .storage import StoreConfigError, make_store, mask_url, open_store, sqlite_path, url_scheme

log = logging.getLogger("aipipe")


def load_env(path: str | None, file_wins: bool = False) -> dict[str, str]:
    """The environment, with the env file's values filling in what the environment does not set (or, file_wins,
    replacing it: on a reload, where systemd's EnvironmentFile put the file's old values in the environment)."""
    env = dict(os.environ)
    if path and os.path.exists(path):
        if not os.path.isfile(path):  # python-dotenv would pass over it in silence
            raise ConfigError(f"cannot read the env file {path}: not a file")
        try:
            values = dotenv_values(path)
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"cannot read the env file {path}: {getattr(e, 'strerror', None) or e}") from None
        for k, v in values.items():
            if v is not None and (file_wins or k not in env):
                env[k] = v
    return env


def ensure_secret(env: dict[str, str], env_file: str) -> None:
    """Make sure AIPIPE_SECRET is set and strong; generate and save one on first run."""
    secret = env.get("AIPIPE_SECRET", "")
    if not secret:
        secret = secrets.token_urlsafe(48)
        try:
            if not os.path.exists(env_file):
                os.close(os.open(env_file, os.O_WRONLY | os.O_CREAT, 0o600))
            set_key(env_file, "AIPIPE_SECRET", secret, quote_mode="never")
            os.chmod(env_file, 0o600)
        except OSError as e:
            raise ConfigError(f"AIPIPE_SECRET is not set and cannot be saved to {env_file}: {e.strerror or e}; "
                              "create that folder (writable), or set AIPIPE_SECRET in the environment") from None
        log.warning("generated a new AIPIPE_SECRET and saved it to %s (mode 0600)", env_file)
        env["AIPIPE_SECRET"] = secret
    if len(secret.encode()) < MIN_SECRET_BYTES:
        raise ConfigError(f"AIPIPE_SECRET is too short: use at least {MIN_SECRET_BYTES} bytes (e.g. `openssl rand -hex 32`)")


def _config(args, need_secret: bool = False, reloading: bool = False) -> Config:
    env = load_env(args.env_file, file_wins=reloading)
    if need_secret:
        ensure_secret(env, args.env_file or ".env")
    if reloading and len(env.get("AIPIPE_SECRET", "").encode()) < MIN_SECRET_BYTES:  # never generate one then
        raise ConfigError(f"AIPIPE_SECRET is missing or shorter than {MIN_SECRET_BYTES} bytes")
    return load_config(args.config, env)


def cmd_serve(args) -> int:
    """Start the server."""
    from .server import run

    if args.log_format:  # before the config is read, so that its errors are lines of this format too
        logs.set_format(args.log_format)
    config = _config(args, need_secret=True)
    logs.set_format(args.log_format or config.get("server.log_format"))
    host = args.host or config.get("server.host")
    port = args.port if args.port is not None else config.get("server.port")
    processes = args.processes if args.processes is not None else config.get("server.processes")
    run(config, host, port, processes, load_config=lambda: _config(args, reloading=True))  # SIGHUP: both files again
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


def checked_email(text: str) -> str:
    """text as a user's email (lower-case), or ConfigError: the admin API's rule."""
    from .handlers.admin import EMAIL

    email = text.strip().lower()
    if not EMAIL.match(email):
        raise ConfigError(f"{text!r} is not an email address")
    return email


def cmd_token(args) -> int:
    """Print a token for an email."""
    email = checked_email(args.email)
    if args.expires_in is not None and not (math.isfinite(args.expires_in) and args.expires_in > 0):
        raise ConfigError("--expires-in must be a positive number of seconds")
    config = _config(args, need_secret=True)

    async def work(store):  # recorded before the token exists, as the admin API does
        await store.add_audit(cli_admin(), "token.mint", email,
                              {"expires_in": args.expires_in} if args.expires_in else {}, time.time())
    _with_store(config, work)
    print(mint_token(email, config.secret, config.salt_for(email), args.expires_in))
    return 0


def cli_admin() -> str:
    """Who made a change from the command line, for the audit trail: cli:<the system user>."""
    try:
        return "cli:" + getpass.getuser()
    except (KeyError, OSError):  # no name for this uid (a container, say)
        return f"cli:uid {os.getuid()}"


def cmd_usage(args) -> int:
    """Print usage as JSON: one email's window, or everyone's daily totals."""
    config = _config(args)

    async def work(store):
        if args.email:
            rules = BudgetRules(config, store)  # the file's rules with those set at runtime on top
            await rules.load()
            budget = rules.budget_for(args.email)
            since = window_start(budget, today_utc())
            rows = await store.daily_usage(args.email.lower(), since)
            return {"email": args.email.lower(), "limit": budget.limit, "cost": sum(c for _, c in rows),
                    "usage": [{"date": d, "cost": c} for d, c in rows]}
        return {"data": await store.all_usage(limit=args.limit)}
    print(json.dumps(_with_store(config, work), indent=2))
    return 0


def cmd_set_cost(args) -> int:
    """Overwrite one day's cost for an email."""
    from .handlers.admin import MAX_COST

    email = checked_email(args.email)
    try:
        day = date.fromisoformat(args.date)
    except ValueError:
        raise ConfigError(f"{args.date!r} is not a date: use YYYY-MM-DD") from None
    if not math.isfinite(args.cost) or args.cost < 0:
        raise ConfigError("cost must be a number of USD, not negative")
    if args.cost > MAX_COST:
        raise ConfigError(f"cost must be at most {MAX_COST:,.0f} USD")
    config = _config(args)

    async def work(store):
        await store.set_cost(email, day, args.cost, time.time())
        await store.add_audit(cli_admin(), "cost.set", email, {"date": day.isoformat(), "cost": float(args.cost)},
                              time.time())
    _with_store(config, work)
    print(f"Cost for {email} on {day.isoformat()} set to {args.cost}")
    return 0


def cmd_check_config(args) -> int:
    """Validate a config file, the env file and the storage URL as `serve` would (or print every setting)."""
    if args.defaults:
        print(example_settings_toml(), end="")
        return 0
    env = load_env(args.env_file)
    config = load_config(args.config, env)
    make_store(config.get("storage.url"))  # refuses what open_store would, without connecting
    secret = env.get("AIPIPE_SECRET", "")
    if secret:
        ensure_secret(env, args.env_file)  # only checks its strength: it is set
    elif not os.access(os.path.dirname(os.path.abspath(args.env_file)), os.W_OK):
        raise ConfigError(f"AIPIPE_SECRET is not set, and serve could not save a generated one to {args.env_file}")
    print(f"aipipe: {args.config or 'built-in defaults'} is valid; "
          f"{len(config.budgets)} budget rules, {len(config.admins)} admins, storage {mask_url(config.get('storage.url'))}")
    print("AIPIPE_SECRET: " + ("set" if secret else f"not set (serve generates one into {args.env_file})"))
    have = [KEY_ENV[name] for name, p in config.providers.items() if p.api_key]
    lack = [KEY_ENV[name] for name, p in config.providers.items() if not p.api_key]
    print("provider keys set: " + (", ".join(have) or "none"))
    if lack:
        print("provider keys missing: " + ", ".join(lack))
    return 0


def cmd_systemd_unit(args) -> int:
    """Print a systemd service unit for this installation."""
    config_path, env_file = os.path.abspath(args.config), os.path.abspath(args.env_file)
    if os.path.exists(config_path):
        config = load_config(config_path, {})
    else:  # written before the config, perhaps: the unit needs only its drain time and store
        log.warning("%s does not exist yet: the unit assumes the default settings", config_path)
        config = load_config(None, {})
    print(systemd.unit_text(config, config_path, env_file, args.user), end="")
    program = systemd.aipipe_command()[0]
    if program.startswith(("/home/", "/root/", "/run/user/")):
        log.warning("%s is in a home folder, which ProtectHome=yes hides from the service: install aipipe "
                    "elsewhere (a virtualenv in /opt/aipipe, say) and run this again", program)
    return 0


def cmd_backup(args) -> int:
    """Copy the SQLite store to DEST, consistently, while the server may be writing it."""
    config = _config(args)
    url = config.get("storage.url")
    if url_scheme(url) != "sqlite":
        raise ConfigError(f"the store is {url_scheme(url)}: back it up with pg_dump (pg_dump -Fc -f aipipe.dump DBNAME)")
    source = sqlite_path(url)
    if source == ":memory:" or not os.path.isfile(source):
        raise ConfigError(f"there is no database file at {source}")
    if os.path.exists(args.dest) and not args.force:
        raise ConfigError(f"{args.dest} exists: choose another name, or add --force to overwrite it")
    partial = f"{args.dest}.{os.getpid()}.partial"
    try:
        rows = copy_sqlite(source, partial)
        if not args.force:
            try:
                os.link(partial, args.dest)  # fails, rather than overwrites, if DEST appeared meanwhile
            except FileExistsError:
                raise ConfigError(f"{args.dest} appeared while backing up: nothing was overwritten") from None
            except OSError:  # a file system without hard links: the check above has to do
                os.replace(partial, args.dest)
        else:
            os.replace(partial, args.dest)
    except (OSError, sqlite3.Error) as e:
        raise ConfigError(f"cannot back up {source} to {args.dest}: {getattr(e, 'strerror', None) or e}") from None
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    print(f"aipipe: backed up {source} to {args.dest} ({rows} ledger rows, {os.path.getsize(args.dest)} bytes)")
    return 0


def copy_sqlite(source: str, dest: str) -> int:
    """Copy source to dest with SQLite's online backup (one snapshot, whatever other connections write meanwhile);
    dest is one self-contained file. Returns its ledger's row count."""
    src = sqlite3.connect(source, timeout=30)
    try:
        dst = sqlite3.connect(dest)
        try:
            src.backup(dst)  # all pages in one step: a single read transaction, so one consistent snapshot
            dst.execute("PRAGMA journal_mode=DELETE")  # no -wal beside the copy: one file to move around
            if dst.execute("PRAGMA quick_check").fetchone()[0] != "ok":
                raise sqlite3.DatabaseError("the copy failed its integrity check")
            return dst.execute("SELECT count(*) FROM ledger").fetchone()[0]
        finally:
            dst.close()
    finally:
        src.close()


def cmd_reload(args) -> int:
    """Send SIGHUP to the running server, found through its pid file."""
    path = systemd.pid_file_for(_config(args))
    pid = systemd.read_pid_file(path)
    if pid is None:
        raise ConfigError(f"no server is running for this config (no pid file {path}; "
                          "under systemd use `systemctl reload aipipe`)")
    if not systemd.runs_aipipe(pid):
        raise ConfigError(f"no server is running for this config (pid {pid} in {path} is not aipipe)")
    try:
        os.kill(pid, signal.SIGHUP)
    except PermissionError:
        raise ConfigError(f"not allowed to signal pid {pid}: run as its user, or `systemctl reload aipipe`") from None
    except ProcessLookupError:
        raise ConfigError(f"the server (pid {pid}) has just exited") from None
    print(f"aipipe: asked the server (pid {pid}) to reload")
    return 0


def version() -> str:
    """The installed package's version (or the source tree's)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("aipipe")
    except PackageNotFoundError:
        from . import __version__
        return __version__


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    parser = argparse.ArgumentParser(prog="aipipe", description="Self-hosted LLM API gateway")
    parser.add_argument("--version", action="version", version=f"aipipe {version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name, func, help_text, config=None, env_file=".env"):
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--config", default=config, help=f"TOML config file (default: {config or 'built-in defaults'})")
        p.add_argument("--env-file", default=env_file, help=f"file of KEY=value secrets (default {env_file})")
        p.set_defaults(func=func)
        return p

    p = add("serve", cmd_serve, "start the server")
    p.add_argument("--host", help="address to listen on (default: server.host)")
    p.add_argument("--port", type=int, help="port to listen on (default: server.port)")
    p.add_argument("--processes", "--workers", type=int, dest="processes", help="worker processes (default 1)")
    p.add_argument("--log-format", choices=logs.FORMATS, help="log lines as text or JSON (default: server.log_format)")
    add("migrate", cmd_migrate, "create or upgrade the database schema")
    p = add("token", cmd_token, "print an AI Pipe token for an email")
    p.add_argument("email", help="the user's email address")
    p.add_argument("--expires-in", type=float, help="seconds until the token expires (default: never)")
    p = add("usage", cmd_usage, "print usage as JSON")
    p.add_argument("--email", help="one user's spend over their budget window (default: everyone's daily totals)")
    p.add_argument("--limit", type=int, default=100, help="most rows of everyone's totals (default 100)")
    p = add("set-cost", cmd_set_cost, "overwrite a day's cost for an email")
    p.add_argument("email", help="the user's email address")
    p.add_argument("date", help="the UTC day, YYYY-MM-DD")
    p.add_argument("cost", type=float, help="the day's total in USD")
    p = add("check-config", cmd_check_config, "validate a config file, the env file and the storage URL")
    p.add_argument("--defaults", action="store_true", help="print every setting with its default")
    p = add("backup", cmd_backup, "copy the SQLite store consistently, while the server runs")
    p.add_argument("dest", help="the file to write")
    p.add_argument("--force", action="store_true", help="overwrite DEST if it exists")
    add("reload", cmd_reload, "tell the running server to reload (SIGHUP)")
    p = add("systemd-unit", cmd_systemd_unit, "print a systemd service unit running this aipipe",
            config="/etc/aipipe/config.toml", env_file="/etc/aipipe/aipipe.env")
    p.add_argument("--user", default="aipipe", help="the service's user and group (default aipipe)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `aipipe` command."""
    logs.setup_logging()
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, StoreConfigError, ValueError) as e:
        if logs.json_lines():  # `serve --log-format json`: every line of its output is an object
            log.error("%s", e)
        else:
            print(f"aipipe: {e}", file=sys.stderr)
        return 1
