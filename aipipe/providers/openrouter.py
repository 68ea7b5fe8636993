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
from .base import MISSING_MODEL, NO_BODY_METHODS, Call, Provider, require_price, set_hold

log = logging.getLogger("aipipe.openrouter")


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
        price = await catalog.price(model)
        if price is None and ":" in model:  # routing suffixes such as :nitro price like the base model
            price = await catalog.price(model.split(":", 1)[0])
        set_hold(call, require_price(call, price, model), gateway.default_hold, 0.0,
                 gateway.config.get("limits.default_max_output_tokens"))

    def catalog(self, gateway) -> ModelCatalog:
        """The gateway's copy of OpenRouter's model price list."""
        def make() -> ModelCatalog:
            c = gateway.config
            return ModelCatalog(c.providers[self.name].base_url + "/v1/models", gateway.upstream,
                                c.get("limits.openrouter_models_ttl"), c.get("limits.openrouter_refetch_seconds"))
        return gateway.provider_state(self.name, make)

    def cost(self, call: Call, usage: Usage) -> float:
        """OpenRouter's own usage.cost when it reports one, else tokens at the listed price."""
        if usage.cost is not None:
            return usage.cost
        return cost_of(call.price, usage) if call.price else 0.0


PROVIDER = OpenRouter()
