"""Prices: the shipped table (USD per million tokens) and the one function that turns usage into USD."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, fields, replace
from importlib import resources

from .usage import Usage

_SNAPSHOT = re.compile(r"-(\d{4}-\d{2}-\d{2}|\d{8}|\d{4}|\d{3}|latest)$")
_LONG = re.compile(r"^(.+)>(\d+)k$")  # "gemini-2.5-pro>200k": the price of prompts above 200,000 tokens


@dataclass(frozen=True)
class Price:
    """A model's prices: token prices are USD per million tokens; None means "same as input/output"."""

    input: float = 0.0
    output: float = 0.0
    cached_input: float | None = None  # cache reads
    cache_write: float | None = None  # prompt-cache writes (Anthropic's 5-minute cache); None: none are charged extra
    cache_write_1h: float | None = None  # 1-hour cache writes; None: as cache_write
    audio_input: float | None = None
    audio_output: float | None = None
    image_input: float | None = None
    per_minute: float = 0.0  # USD per minute of audio (whisper-1)
    per_million_chars: float = 0.0  # USD per million characters of text to speech
    per_image: float = 0.0
    per_request: float = 0.0
    per_web_search: float = 0.0  # USD per web search the provider ran for the call
    max_output: int = 0  # the most output tokens one answer (one choice) may have; 0 = not known
    long_above: int = 0  # prompts of more tokens than this (cache reads and writes included) cost `long`
    long: "Price | None" = None


_PRICE_FIELDS = {f.name for f in fields(Price)}


def price_from_dict(d: dict) -> Price:
    """A Price from a pricing.json entry; unknown keys are ignored."""
    return Price(**{k: int(v) if k == "max_output" else float(v)
                    for k, v in d.items() if k in _PRICE_FIELDS and k not in ("long", "long_above") and v is not None})


def cost_of(price: Price, usage: Usage) -> float:
    """USD for usage at price (its long-prompt price above long_above prompt tokens). Cached, cache-write, audio
    and image tokens are parts of the totals, billed at their own rates."""
    if price.long is not None and usage.input_tokens > price.long_above:
        price = price.long
    if not (usage.cached_tokens or usage.audio_input_tokens or usage.image_input_tokens or usage.audio_output_tokens
            or usage.seconds or usage.cache_write_tokens or usage.cache_write_1h_tokens or usage.web_searches):
        # text only, the usual call: the sum below with its zero terms left out (same result)
        return tokens_cost(price, usage.input_tokens, usage.output_tokens)
    cached = min(usage.cached_tokens, usage.input_tokens)
    write_1h = min(usage.cache_write_1h_tokens, usage.input_tokens - cached)
    write_5m = min(usage.cache_write_tokens, usage.input_tokens - cached - write_1h)
    audio_in = min(usage.audio_input_tokens, usage.input_tokens - cached - write_1h - write_5m)
    image_in = min(usage.image_input_tokens, usage.input_tokens - cached - write_1h - write_5m - audio_in)
    text_in = usage.input_tokens - cached - write_1h - write_5m - audio_in - image_in
    audio_out = min(usage.audio_output_tokens, usage.output_tokens)
    text_out = usage.output_tokens - audio_out
    write = _or(price.cache_write, price.input)
    per_token = (
        text_in * price.input
        + cached * _or(price.cached_input, price.input)
        + write_5m * write
        + write_1h * _or(price.cache_write_1h, write)
        + audio_in * _or(price.audio_input, price.input)
        + image_in * _or(price.image_input, price.input)
        + text_out * price.output
        + audio_out * _or(price.audio_output, price.output)
    ) / 1e6
    return (per_token + usage.seconds / 60 * price.per_minute + usage.web_searches * price.per_web_search
            + price.per_request)


def tokens_cost(price: Price, input_tokens: int, output_tokens: int) -> float:
    """USD for text tokens only: cost_of with no cached, audio or image tokens."""
    return (input_tokens * price.input + output_tokens * price.output) / 1e6 + price.per_request


def input_price(price: Price) -> float:
    """USD per million prompt tokens at the dearest rate a text prompt can be billed (a cache write may cost more)."""
    return max(price.input, price.cache_write or 0.0, price.cache_write_1h or 0.0)


def output_price(price: Price) -> float:
    """USD per million output tokens at the dearest output rate (audio output may cost more than text)."""
    return price.output if price.audio_output is None else max(price.output, price.audio_output)


def _or(value: float | None, fallback: float) -> float:
    return fallback if value is None else value


class PriceTable:
    """The shipped price list, by provider and model."""

    def __init__(self, data: dict):
        self._prices = {provider: _with_long_prices({model: price_from_dict(p) for model, p in models.items()})
                        for provider, models in data.items() if not provider.startswith("_")}

    @classmethod
    def shipped(cls) -> "PriceTable":
        """The table in aipipe/pricing.json."""
        return cls(json.loads(resources.files("aipipe").joinpath("pricing.json").read_text()))

    def models(self, provider: str) -> list[str]:
        """The models priced for a provider, in the table's order."""
        return list(self._prices.get(provider, {}))

    def lookup(self, provider: str, model: str) -> Price | None:
        """A model's price; dated snapshots (gpt-4o-mini-2024-07-18, gpt-4-0613) fall back to the base model."""
        table = self._prices.get(provider, {})
        if not isinstance(model, str) or not model:
            return None
        model = model.removeprefix("models/")
        price = table.get(model)
        while price is None and _SNAPSHOT.search(model):
            model = _SNAPSHOT.sub("", model, count=1)
            price = table.get(model)
        return price


def _with_long_prices(table: dict[str, Price]) -> dict[str, Price]:
    """Fold each "<model>><N>k" entry into <model>'s price as its long-prompt price."""
    out = {}
    for model, price in table.items():
        if _LONG.match(model) is None:
            out[model] = price
    for model, price in table.items():
        match = _LONG.match(model)
        if match is not None and match.group(1) in out:
            out[match.group(1)] = replace(out[match.group(1)], long_above=int(match.group(2)) * 1000, long=price)
    return out
