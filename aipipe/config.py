"""Configuration: TOML file -> frozen dataclasses, secrets from the environment.

Every scalar key lives in SETTINGS with its default and help text; that one table drives
parsing, validation, `aipipe check-config` and the documentation in config.example.toml.
"""
from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping

from .providers import BY_NAME as PROVIDER_TABLE

PROVIDER_NAMES = tuple(PROVIDER_TABLE)  # [providers.<name>] sections, from the provider table
PERIODS = ("day", "week", "month")
CHOICES = {"storage.admission": ("auto", "store"), "server.log_format": ("text", "json")}


def budget_for(rules: Mapping[str, Budget], email: str) -> Budget:
    """The rule for an email: by the exact (lower-cased) email, then its @domain, then "*", else a zero limit."""
    email = email.lower()
    for key in (email, "@" + email.rsplit("@", 1)[-1], "*"):
        budget = rules.get(key)
        if budget is not None:
            return budget
    return Budget(limit=0.0, days=1)


class ConfigError(ValueError):
    """A configuration problem; the message names the offending key."""


@dataclass(frozen=True)
class Setting:
    key: str  # "section.name"
    default: Any
    help: str


SETTINGS: tuple[Setting, ...] = (
    Setting("server.host", "127.0.0.1", "Address to listen on"),
    Setting("server.port", 8787, "Port to listen on"),
    Setting("server.processes", 1, "Worker processes sharing the port (needs a store every process can reach)"),
    Setting("server.xheaders", False, "Trust X-Forwarded-For / X-Real-IP from a reverse proxy"),
    Setting("server.max_body_bytes", 32 * 1024 * 1024, "Largest request body, bytes (413 above it; room for a 25 MB audio upload)"),
    Setting("server.max_connections", 4096, "Most client connections open at once (also kept below the open-file limit)"),
    Setting("server.idle_seconds", 60.0, "Seconds a connection may take to send a request's headers, or sit idle between requests"),
    Setting("server.body_seconds", 300.0, "Seconds a client may take to send a request's body"),
    Setting("server.log_format", "text", 'Log lines as "text" or "json" (one object per line); --log-format wins'),
    Setting("server.metrics_token", "", "Bearer token GET /metrics requires (empty: none, for a port only Prometheus reaches)"),
    Setting("server.drain_seconds", 30.0, "On SIGTERM, seconds open requests and streams get to finish before they are cut (and billed)"),
    Setting("storage.url", "sqlite:///aipipe.db", "sqlite:///relative.db, sqlite:////abs/path.db or postgresql://user:pass@host:port/db"),
    Setting("storage.pool_min", 1, "Postgres: connections kept open"),
    Setting("storage.pool_max", 10, "Postgres: most connections at once"),
    Setting("storage.admission", "auto", '"auto": one process on an SQLite file keeps budgets in memory; '
                                          '"store": every admission is a database transaction (to share one file)'),
    Setting("auth.admins", [], "Admin emails (merged with the ADMIN_EMAILS environment variable)"),
    Setting("auth.allow_native_keys", True, "Pass provider keys (sk-..., AIza...) straight through, untracked"),
    Setting("auth.token_cache_seconds", 60.0, "How long a verified token is remembered (salt changes need a restart anyway)"),
    Setting("auth.google_client_id", "", "Google OAuth client id for /login"),
    Setting("auth.google_certs_url", "https://www.googleapis.com/oauth2/v1/certs", "Where Google's signing certificates are fetched"),
    Setting("auth.redirect_origins", [], "Origins /login may hand tokens to without asking, e.g. http://localhost:*"),
    Setting("limits.default_hold_usd", 0.01, "Extra budget held for a priced call whose input the request cannot bound "
                                             "(an uploaded audio file, audio priced by the minute)"),
    Setting("limits.default_max_output_tokens", 32768, "Output tokens held for a call naming no max_tokens on a model "
                                                       "whose maximum output is not known (32768: gpt-4.1's maximum)"),
    Setting("limits.hold_seconds", 600.0, "Holds left behind by a crash expire after this long"),
    Setting("limits.max_concurrent_per_user", 8, "Requests one user may have in flight (0 = no cap)"),
    Setting("limits.rpm_per_user", 0, "Requests per minute per user (0 = no limit)"),
    Setting("limits.upstream_timeout", 300.0, "Seconds an LLM call may take before 504"),
    Setting("limits.openrouter_models_ttl", 3600.0, "Seconds the OpenRouter model price list is cached"),
    Setting("limits.openrouter_refetch_seconds", 60.0, "Least time between refetches of that list on an unknown model"),
    Setting("proxy.enabled", True, "Serve /proxy/<url>"),
    Setting("proxy.allow_private", False, "Let /proxy reach loopback and private networks"),
    Setting("proxy.require_token", False, "Demand an AI Pipe token for /proxy"),
    Setting("proxy.max_bytes", 10_000_000, "Largest /proxy response, bytes"),
    Setting("proxy.timeout", 30.0, "Seconds before /proxy answers 504"),
    Setting("similarity.max_items", 2048, "Most docs + topics in one /similarity call"),
    Setting("similarity.max_chars", 2_000_000, "Most characters in one /similarity call"),
)
_BY_KEY = {s.key: s for s in SETTINGS}
_TABLE_SECTIONS = ("budget", "salt", "providers")

DEFAULT_BASE_URLS = {name: p.default_base_url for name, p in PROVIDER_TABLE.items()}
KEY_ENV = {name: p.key_env for name, p in PROVIDER_TABLE.items()}


@dataclass(frozen=True)
class Budget:
    """A spending limit in USD over a rolling window of days or a calendar period."""

    limit: float
    days: int = 1
    period: str | None = None  # "day" | "week" | "month": resets at UTC boundaries
    models: tuple[str, ...] = ()  # shell-style patterns of the models its users may call; () allows every priced model


@dataclass(frozen=True)
class Provider:
    """Where one provider lives and the operator's key for it."""

    name: str
    base_url: str
    api_key: str = field(default="", repr=False)


@dataclass(frozen=True)
class Config:
    """The whole, validated configuration of one server."""

    values: Mapping[str, Any]
    budgets: Mapping[str, Budget]
    salts: Mapping[str, str]
    providers: Mapping[str, Provider]
    admins: frozenset[str]
    secret: str = field(default="", repr=False)

    def get(self, key: str) -> Any:
        """Value of a SETTINGS key such as "limits.hold_seconds"."""
        return self.values[key]

    def budget_for(self, email: str) -> Budget:
        """The file's budget for an email (budget_for below); the server reads aipipe.rules, which adds the
        rules admins set at runtime."""
        return budget_for(self.budgets, email)

    def salt_for(self, email: str) -> str | None:
        """The configured salt for an email, if any."""
        return self.salts.get(email.lower())


def _check_type(key: str, value: Any, default: Any) -> Any:
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false")
    elif isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be a whole number")
        if value < 0:
            raise ConfigError(f"{key} must not be negative")
    elif isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number")
        if value < 0:
            raise ConfigError(f"{key} must not be negative")
        value = float(value)
    elif isinstance(default, list):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{key} must be a list of strings")
    elif isinstance(default, str) and not isinstance(value, str):
        raise ConfigError(f"{key} must be a string")
    if key in CHOICES and value not in CHOICES[key]:
        raise ConfigError(f"{key} must be one of " + ", ".join(f'"{c}"' for c in CHOICES[key]))
    return value


def _parse_budget(key: str, raw: Any) -> Budget:
    where = f'budget."{key}"'
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a table like {{ limit = 1.0, days = 7 }}")
    unknown = set(raw) - {"limit", "days", "period", "models"}
    if unknown:
        raise ConfigError(f"{where}.{sorted(unknown)[0]} is not a budget key (use limit, days, period, models)")
    limit = raw.get("limit")
    if isinstance(limit, bool) or not isinstance(limit, (int, float)):
        raise ConfigError(f"{where}.limit must be a number of USD")
    if limit < 0:
        raise ConfigError(f"{where}.limit must not be negative")
    days = raw.get("days", 1)
    if isinstance(days, bool) or not isinstance(days, int) or not 1 <= days <= 366:
        raise ConfigError(f"{where}.days must be a whole number from 1 to 366")
    period = raw.get("period")
    if period is not None and period not in PERIODS:
        raise ConfigError(f'{where}.period must be one of "day", "week", "month"')
    models = raw.get("models", [])
    if not isinstance(models, list) or not all(isinstance(m, str) and m.strip() for m in models):
        raise ConfigError(f'{where}.models must be a list of model patterns, like ["gpt-4o-mini", "claude-haiku-*"]')
    return Budget(limit=float(limit), days=days, period=period, models=tuple(m.strip() for m in models))


def _parse_providers(raw: Any, env: Mapping[str, str]) -> dict[str, Provider]:
    if not isinstance(raw, dict):
        raise ConfigError("providers must be a table of [providers.NAME] sections")
    for name, section in raw.items():
        if name not in PROVIDER_NAMES:
            raise ConfigError(f"providers.{name} is not a known provider (known: {', '.join(PROVIDER_NAMES)})")
        if not isinstance(section, dict):
            raise ConfigError(f"providers.{name} must be a table")
        for key in section:
            if key != "base_url":
                raise ConfigError(f"providers.{name}.{key} is not a provider key (use base_url)")
        url = section.get("base_url", DEFAULT_BASE_URLS[name])
        if not isinstance(url, str) or not re.match(r"^https?://[^/]", url):
            raise ConfigError(f"providers.{name}.base_url must be an http(s) URL")
    out = {}
    for name in PROVIDER_NAMES:
        url = raw.get(name, {}).get("base_url", DEFAULT_BASE_URLS[name]).rstrip("/")
        out[name] = Provider(name=name, base_url=url, api_key=env.get(KEY_ENV[name], "").strip())
    return out


def _lower_keys(section: str, raw: Any) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise ConfigError(f"{section} must be a table")
    return {str(k).strip().lower(): v for k, v in raw.items()}


def parse_admins(text: str) -> list[str]:
    """Split ADMIN_EMAILS on commas and/or whitespace."""
    return [e.lower() for e in re.split(r"[,\s]+", text or "") if e]


def build_config(data: Mapping[str, Any], env: Mapping[str, str] | None = None) -> Config:
    """Validate parsed TOML (a dict) and environment into a Config."""
    env = os.environ if env is None else env
    values = {s.key: s.default for s in SETTINGS}
    for section, body in data.items():
        if section in _TABLE_SECTIONS:
            continue
        if not isinstance(body, dict):
            raise ConfigError(f"{section} must be a [{section}] table")
        for name, value in body.items():
            key = f"{section}.{name}"
            if key not in _BY_KEY:
                raise ConfigError(f"{key} is not a known setting")
            values[key] = _check_type(key, value, _BY_KEY[key].default)
    budgets = {k: _parse_budget(k, v) for k, v in _lower_keys("budget", data.get("budget", {})).items()}
    salts = _lower_keys("salt", data.get("salt", {}))
    for k, v in salts.items():
        if not isinstance(v, str):
            raise ConfigError(f'salt."{k}" must be a string')
    admins = frozenset(e.lower() for e in values["auth.admins"]) | frozenset(parse_admins(env.get("ADMIN_EMAILS", "")))
    return Config(
        values=MappingProxyType(values),
        budgets=MappingProxyType(budgets),
        salts=MappingProxyType(salts),
        providers=MappingProxyType(_parse_providers(data.get("providers", {}), env)),
        admins=admins,
        secret=env.get("AIPIPE_SECRET", ""),
    )


def load_config(path: str | None, env: Mapping[str, str] | None = None) -> Config:
    """Read a TOML file (or nothing, for built-in defaults) into a Config."""
    data: dict[str, Any] = {}
    if path:
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError(f"config file {path} not found") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
    return build_config(data, env)


def example_settings_toml() -> str:
    """The scalar settings with defaults and help, as TOML comments (for check-config --defaults)."""
    lines, section = [], None
    for s in SETTINGS:
        sec, name = s.key.split(".", 1)
        if sec != section:
            lines.append(f"\n[{sec}]")
            section = sec
        value = repr(s.default).replace("'", '"') if not isinstance(s.default, bool) else str(s.default).lower()
        lines.append(f"# {s.help}\n{name} = {value}")
    return "\n".join(lines).lstrip() + "\n"
