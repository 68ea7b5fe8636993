"""OpenRouter: /openrouter/* -> {base_url}/*, priced by usage.cost or the live model list."""
from __future__ import annotations

import logging
import time

import orjson

from ..errors import ApiError
from ..singleflight import SingleFlight
from ..pricing import Price, cost_of
from ..upstream import describe
from ..usage import Usage
from .base import MISSING_MODEL, NO_BODY_METHODS, Call, Provider, count_asked, require_price, set_hold

log = logging.getLogger("aipipe.openrouter")
MAX_FALLBACKS = 16  # models one call may name for OpenRouter to fall back on
# OpenRouter's web plugin (a model's ":online" variant, or plugins [{"id": "web"}]) costs $4 per 1,000 results,
# 5 results a call unless max_results says otherwise: billed in its usage.cost, held here
WEB_RESULT_USD, WEB_RESULTS = 0.004, 5


def price_from_pricing(pricing: dict, model: dict | None = None) -> Price:
    """OpenRouter's per-token price strings as a Price in USD per million tokens.

    `model`, the model's whole /api/v1/models entry, gives its maximum output: the top provider's
    max_completion_tokens, else the context length (no answer is longer than its context).
    """
    def per_million(key: str) -> float | None:
        try:
            value = float(pricing[key])
        except (KeyError, TypeError, ValueError):
            return None
        return value * 1e6 if value >= 0 else None  # -1 marks "varies": treat as unknown

    prompt, completion = per_million("prompt"), per_million("completion")
    if prompt is None or completion is None:
        raise ValueError("no prompt/completion price")
    request = per_million("request")
    return Price(input=prompt, output=completion, cached_input=per_million("input_cache_read"),
                 image_input=per_million("image") or None, per_request=(request or 0) / 1e6,
                 max_output=_max_output(model) if isinstance(model, dict) else 0)


def _max_output(model: dict) -> int:
    top = model.get("top_provider")
    for v in (top.get("max_completion_tokens") if isinstance(top, dict) else None, model.get("context_length")):
        if v.__class__ is int and v > 0:
            return v
    return 0


class ModelCatalog:
    """OpenRouter's /v1/models prices, cached for `ttl`; refetched on a miss at most every `refetch`."""

    def __init__(self, url: str, http, ttl: float = 3600.0, refetch: float = 60.0):
        self.url, self.http, self.ttl, self.refetch = url, http, ttl, refetch
        self.prices: dict[str, Price] = {}
        self.fetched_at = float("-inf")
        self._refresh = SingleFlight(self._fetch)  # one fetch serves every caller waiting on it

    async def price(self, model: str) -> Price | None:
        """The model's price, fetching the list when it is stale or (rate-limited) when the model is new; a caller
        whose model is not listed yet waits for a fetch in flight (which set fetched_at when it started)."""
        age = time.monotonic() - self.fetched_at
        unknown = model not in self.prices
        if age > self.ttl or (unknown and (age > self.refetch or self._refresh.running)):
            await self._refresh.run()
        return self.prices.get(model)

    async def _fetch(self) -> None:
        self.fetched_at = time.monotonic()  # set first: a failing list is not hammered either
        try:
            answer = await self.http.fetch("GET", self.url, timeout=30)
            if isinstance(answer, BaseException):
                raise RuntimeError(describe(answer))
            if answer.status != 200:
                raise RuntimeError(f"answered {answer.status}")
            models = orjson.loads(answer.body)["data"]
        except Exception as e:
            log.warning("could not load OpenRouter model prices from %s: %s", self.url, e)
            return
        prices = {}
        for m in models:
            try:
                prices[m["id"]] = price_from_pricing(m["pricing"], m)  # m: its maximum output as well
            except (KeyError, TypeError, ValueError):
                continue
        self.prices = prices


class OpenRouter(Provider):
    """OpenRouter's OpenAI-compatible API across many models."""

    route = name = "openrouter"
    label = "OpenRouter"
    default_base_url = "https://openrouter.ai/api"
    key_env = "OPENROUTER_API_KEY"
    forwarded = frozenset({"openai-beta", "http-referer", "x-title"})  # HTTP-Referer and X-Title: app attribution

    async def prepare(self, call: Call, gateway) -> None:
        """Require a model OpenRouter lists a price for."""
        if call.method in NO_BODY_METHODS:
            return
        model = call.body_model()
        if not model:
            raise ApiError(400, MISSING_MODEL)
        catalog = self.catalog(gateway)
        # OpenRouter runs the call on the first of `models` that answers when the model fails: each must be priced
        # (and allowed the user), and the call is held at the dearest of them
        candidates = [model, *(m for m in self._fallbacks(call.data) if m != model)]
        prices = {}
        for name in candidates:
            price = await catalog.price(name)
            if price is None and ":" in name:  # routing suffixes such as :nitro price like the base model
                price = await catalog.price(name.split(":", 1)[0])
            if price is None:
                raise ApiError(400, f"Model {name} pricing unknown")
            prices[name] = price
        require_price(call, prices[model], model)
        call.fallback_models, call.extra["prices"] = tuple(candidates[1:]), prices
        searching = call.extra["web_fee"] = self._web_results(call.data, candidates) * WEB_RESULT_USD
        holds = []
        for price in prices.values():
            set_hold(call, price, gateway.default_hold, searching,
                     gateway.config.get("limits.default_max_output_tokens"))
            holds.append((call.hold, call.fallback_cost, call.input_estimate))
        call.hold, call.fallback_cost, call.input_estimate = max(holds)

    @staticmethod
    def _web_results(data, models: list[str]) -> int:
        """How many web results the call may pay for: the web plugin's max_results, or 5 for ":online" models."""
        plugins = data.get("plugins") if isinstance(data, dict) else None
        webs = [p for p in (plugins if isinstance(plugins, list) else ()) if isinstance(p, dict) and p.get("id") == "web"]
        if webs:  # as many as the request asks for, however many (100.0 too): a smaller hold lets spend pass the limit
            return max(count_asked(p.get("max_results"), WEB_RESULTS) for p in webs)
        return WEB_RESULTS if any(m.endswith(":online") for m in models) else 0

    @staticmethod
    def _fallbacks(data) -> list[str]:
        """The body's `models` (fallbacks), checked: a list of at most MAX_FALLBACKS model names."""
        models = data.get("models") if isinstance(data, dict) else None
        if models is None:
            return []
        if (not isinstance(models, list) or len(models) > MAX_FALLBACKS
                or not all(isinstance(m, str) and m for m in models)):
            raise ApiError(400, f"models must be a list of at most {MAX_FALLBACKS} model names")
        return list(dict.fromkeys(models))

    def catalog(self, gateway) -> ModelCatalog:
        """The gateway's copy of OpenRouter's model price list."""
        def make() -> ModelCatalog:
            c = gateway.config
            return ModelCatalog(c.providers[self.name].base_url + "/v1/models", gateway.upstream,
                                c.get("limits.openrouter_models_ttl"), c.get("limits.openrouter_refetch_seconds"))
        return gateway.provider_state(self.name, make)

    def cost(self, call: Call, usage: Usage) -> float:
        """OpenRouter's own usage.cost when it reports one, else tokens at the listed price of the model that
        answered (the dearest of the call's models when the answer does not say which) plus the web results the
        call allowed."""
        if usage.cost is not None:
            return usage.cost
        prices = call.extra.get("prices") or ({call.model: call.price} if call.price else {})
        if usage.model in prices:
            tokens = cost_of(prices[usage.model], usage)
        else:
            tokens = max((cost_of(price, usage) for price in prices.values()), default=0.0)
        return tokens + call.extra.get("web_fee", 0.0)


PROVIDER = OpenRouter()
