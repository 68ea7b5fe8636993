"""The gateway's shared state: config, store, ledger, token checks, prices and the upstream client.

Handlers receive one Gateway through the route table and never reach for globals.
"""
from __future__ import annotations

import asyncio
import logging
import math
import time
from datetime import date

from .auth import AuthError, Identity, TokenVerifier, is_native_key, token_from_headers
from .books import Books
from .budget import model_allowed, over_budget_message, today_utc, utc_date, window_start
from .config import Budget, Config
from .errors import ApiError
from .admission import choose_admission
from .metrics import Metrics
from .pricing import PriceTable
from .providers import TOKEN_HEADERS
from .providers.base import Call
from .rules import BudgetRules
from .storage import Charge, Decision, HoldRequest, Store, StoreUnavailable
from .storage.base import safe_cost
from .upstream import Upstream

log = logging.getLogger("aipipe")
STORE_DOWN = "Usage store unavailable, try again shortly"
HEALTH_SECONDS = 1.0  # /healthz asks the store at most this often
# settings a running server cannot take on a reload: where it listens and stores, and what its sockets, routes and
# log handler were built with
RESTART_ONLY = ("server.host", "server.port", "server.processes", "server.xheaders", "server.max_body_bytes",
                "server.max_connections", "server.idle_seconds", "server.body_seconds", "server.log_format",
                "storage.url", "storage.pool_min", "storage.pool_max", "storage.admission", "proxy.allow_private",
                "auth.google_certs_url")
HEALTH_TIMEOUT = 2.0


class Gateway:
    """Everything a request handler needs, built once per server process."""

    def __init__(self, config: Config, store: Store, prices: PriceTable | None = None, spool_dir: str | None = None,
                 processes: int = 1):
        self.store = store
        self.metrics = Metrics()
        # budgets in memory when this process is the only one using an SQLite file, else in the store
        self.ledger, self.admission = choose_admission(config.get("storage.admission"), store, processes, spool_dir,
                                                       self.metrics)
        self.upstream = Upstream()  # every outside call: providers, Google's keys, OpenRouter's model list
        self._tasks: list[asyncio.Task] = []
        self._health: tuple[float, str | None] = (float("-inf"), None)  # (when checked, what was wrong)
        # the file's budgets and the store's
        self.rules = BudgetRules(config, store, watch=not self.admission.in_memory)
        self._use(config, prices or PriceTable.shipped())

    def _use(self, config: Config, prices: PriceTable) -> None:
        """Take config and prices for every request from now on (at start, and on reload)."""
        self.config, self.prices = config, prices
        self.verifier = TokenVerifier(config.secret, config.salts, config.get("auth.token_cache_seconds"))
        self.default_hold = config.get("limits.default_hold_usd")
        self.upstream_timeout = config.get("limits.upstream_timeout")
        self._max_inflight, self._rpm, self._hold_seconds = (
            config.get("limits.max_concurrent_per_user"), config.get("limits.rpm_per_user"), config.get("limits.hold_seconds"))
        self._provider_state: dict = {}  # provider name -> what it keeps (provider_state)
        self._windows: dict[str, tuple[date, Budget, date]] = {}  # email -> (today, budget, window start)
        self.rules.use_config(config)
        self._rules_version = self.rules.version  # _windows holds budgets of this version of the rules

    def reload(self, config: Config) -> list[str]:
        """Apply a re-read config (and pricing.json) to the next request; returns the changed settings that only
        take effect after a restart. Calls in flight keep what they started with."""
        kept = [key for key in RESTART_ONLY if config.get(key) != self.config.get(key)]
        self._use(config, PriceTable.shipped())
        return kept

    @property
    def books(self) -> Books | None:
        """The in-memory budgets, when admission happens in memory."""
        return self.admission.books

    async def start(self) -> None:
        """Claim the store, then start background work: the ledger writer, admission's upkeep."""
        self.store.claim(exclusive=self.admission.in_memory)
        await self.rules.load()
        self.ledger.start()
        await self.admission.start()
        if self.metrics.multiprocess:  # other workers answer scrapes too: they read what this one flushed
            self._tasks.append(asyncio.get_running_loop().create_task(self._flush_metrics_forever()))

    async def close(self) -> None:
        """Write pending charges and stop background work."""
        for task in self._tasks:
            task.cancel()
        await self.ledger.close()
        await self.admission.close()
        self.metrics.flush()
        await self.upstream.close()

    async def _flush_metrics_forever(self, every: float = 1.0) -> None:
        while True:
            await asyncio.sleep(every)
            self.metrics.flush()

    async def health(self) -> str | None:
        """None while the store answers and charges are being written, else what is wrong (checked at most once a
        second, however often it is polled)."""
        now = time.monotonic()
        if now - self._health[0] < HEALTH_SECONDS:
            return self._health[1]
        self._health = (now, self._health[1])  # callers arriving during the check get the last answer
        try:
            await asyncio.wait_for(self.store.spend("", today_utc()), HEALTH_TIMEOUT)
            problem = "charges cannot be written to the store" if self.ledger.failing else None
        except Exception as e:
            problem = "usage store unavailable"
            log.warning("health check: the store did not answer: %s", type(e).__name__)
        self._health = (time.monotonic(), problem)
        return problem

    async def held(self, email: str) -> float:
        """USD held right now by email's requests in flight."""
        return await self.admission.held(email, time.time())

    async def set_cost(self, email: str, day, cost: float) -> None:
        """Overwrite one day's total (an admin correction) and make admission see it."""
        await self.ledger.flush()  # charges already made are part of what the new total replaces
        await self.store.set_cost(email, day, cost, time.time())
        self.admission.forget_spend(email)

    def identify(self, headers, allow_native: bool = True, token_headers: tuple[str, ...] = TOKEN_HEADERS) -> Identity:
        """Who sent the request, by the token in the first of `token_headers` that has one; 401 for missing or bad
        tokens."""
        token = token_from_headers(headers, token_headers)
        if token and is_native_key(token):
            if not (allow_native and self.config.get("auth.allow_native_keys")):
                raise ApiError(401, "Provider keys cannot be used here: use an AI Pipe token")
            return Identity(email=None, native_key=token)
        try:
            return Identity(email=self.verifier.verify(token))
        except AuthError as e:
            raise ApiError(401, str(e)) from None

    def is_admin(self, email: str | None) -> bool:
        """Whether email is an admin."""
        return bool(email) and email in self.config.admins

    @staticmethod
    def _check_model(budget: Budget, provider, call: Call) -> None:
        """403 when the budget names the models its users may call and the call may run on another."""
        if not budget.models:
            return
        for model in (call.model, *call.fallback_models):
            if model and not model_allowed(budget.models, provider.name, model):
                raise ApiError(403, f"Model {model} is not allowed for you")

    def provider_key(self, name: str) -> str:
        """The operator's key for a provider; 503 if the operator set none."""
        key = self.config.providers[name].api_key
        if not key:
            raise ApiError(503, f"{name} is not configured on this server")
        return key

    def provider_state(self, name: str, make):
        """What a provider keeps for this gateway (OpenRouter's price list): made by `make()` on first use, and
        afresh after a reload."""
        state = self._provider_state.get(name)
        if state is None:
            state = self._provider_state[name] = make()
        return state

    async def admit(self, email: str, provider, call: Call) -> Decision:
        """Check the call's models against the user's rules, then budget, concurrency and rate, and hold what the
        call may cost (call.hold); 403, 429 or 503 when refused."""
        if not self.admission.in_memory:
            await self.rules.sync()  # a rule another process or instance set applies to this request
        budget, request = self._hold_request(email, call.hold)
        self._check_model(budget, provider, call)
        try:
            decision = await self.admission.decide(request)
        except StoreUnavailable as e:
            raise self._store_down(e) from None
        return self._admitted(decision, request, budget)

    def admit_now(self, email: str, provider, call: Call) -> Decision | None:
        """admit(), when deciding takes no wait (budgets in memory and the user's spend read); else None."""
        if not self.admission.in_memory:
            return None
        budget, request = self._hold_request(email, call.hold)
        self._check_model(budget, provider, call)
        try:
            decision = self.admission.decide_now(request)
        except StoreUnavailable as e:
            raise self._store_down(e) from None
        return None if decision is None else self._admitted(decision, request, budget)

    def _hold_request(self, email: str, hold: float) -> tuple[Budget, HoldRequest]:
        budget, since = self._window(email)
        return budget, HoldRequest(email, hold, since, budget.limit, self._max_inflight, self._rpm, self._hold_seconds)

    def _store_down(self, error: StoreUnavailable) -> ApiError:
        self.metrics.store_errors.inc()
        log.error("store unavailable while admitting a request: %s", error)
        return ApiError(503, STORE_DOWN)

    def _admitted(self, admission: Decision, request: HoldRequest, budget: Budget) -> Decision:
        """The admission, or the 429 that tells why it was refused."""
        if admission.refused is None:
            return admission
        self.metrics.add(self.metrics.refusals, (admission.refused,))
        if admission.refused == "budget":
            # waiting will not help until the window moves on: the OpenAI SDKs honour x-should-retry and give up at once
            raise ApiError(429, over_budget_message(admission.spent + admission.held, budget, request.amount),
                           {"x-should-retry": "false"})
        if admission.refused == "concurrency":
            raise ApiError(429, f"Too many requests in flight (at most {request.max_inflight} at once)",
                           {"Retry-After": str(admission.retry_after)})
        if admission.refused == "rate":
            raise ApiError(429, f"Rate limit: at most {request.rpm} requests per minute",
                           {"Retry-After": str(admission.retry_after)})
        return admission

    def _window(self, email: str) -> tuple[Budget, date]:
        """The user's budget and the first day of its window today (looked up once a day per user)."""
        today = today_utc()
        if self._rules_version != self.rules.version:  # an admin changed the rules: look budgets up again
            self._windows.clear()
            self._rules_version = self.rules.version
        known = self._windows.get(email)
        if known is None or known[0] != today:
            if len(self._windows) >= 100_000:
                self._windows.clear()
            budget = self.rules.budget_for(email)
            known = self._windows[email] = (today, budget, window_start(budget, today))
        return known[1], known[2]

    def settle(self, email: str, admission: Decision, provider: str, call: Call, outcome,
               duration_ms: float) -> None:
        """Queue the call's charge (or just release its hold when it cost nothing)."""
        billed = call.billable and (200 <= outcome.status < 300 or outcome.cut)
        usage, now = outcome.usage, time.time()
        tokens_in, tokens_out = (usage.input_tokens, usage.output_tokens) if usage else (0, 0)
        if billed:
            self.metrics.charged(provider, outcome.cost, tokens_in, tokens_out)
        charge = Charge(  # by position, the quickest way to build one
            email, utc_date(now), outcome.cost if billed else 0.0, admission.hold_id, "request" if billed else "release",
            provider, call.model, tokens_in, tokens_out,
            outcome.status, duration_ms, outcome.streamed, outcome.aborted, now)
        if not 0.0 <= charge.cost < math.inf:  # cleaned before the in-memory books see it, not only the ledger
            charge.cost = safe_cost(charge)
        if self.admission.settled(charge):  # not when it only released a hold kept in memory
            self.ledger.settle(charge)
