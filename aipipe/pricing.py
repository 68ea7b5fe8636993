"""Prices: the shipped table (USD per million tokens) and the one function that turns usage into USD."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, fields
from importlib import resources

from .usage import Usage

_SNAPSHOT = re.compile(r"-(\d{4}-\d{2}-\d{2}|\d{4}|\d{3})$")


@dataclass(frozen=True)
class Price:
    """A model's prices: token prices are USD per million tokens; None means "same as input/output"."""

    input: float = 0.0
    output: float = 0.0
    cached_input: float | None = None
    audio_input: float | None = None
    audio_output: float | None = None
    image_input: float | None = None
    per_minute: float = 0.0  # USD per minute of audio (whisper-1)
    per_million_chars: float = 0.0  # USD per million characters of text to speech
    per_image: float = 0.0
    per_request: float = 0.0
    max_output: int = 0  # the most output tokens one answer (one choice) may have; 0 = not known


_PRICE_FIELDS = {f.name for f in fields(Price)}


def price_from_dict(d: dict) -> Price:
    """A Price from a pricing.json entry; unknown keys are ignored."""
    return Price(**{k: int(v) if k == "max_output" else float(v)
                    for k, v in d.items() if k in _PRICE_FIELDS and v is not None})


def cost_of(price: Price, usage: Usage) -> float:
    """USD for usage at price. Cached, audio and image tokens are parts of the totals, billed at their own rates."""
    if not (usage.cached_tokens or usage.audio_input_tokens or usage.image_input_tokens or usage.audio_output_tokens
            or usage.seconds):  # text only, the usual call: the sum below with its zero terms left out (same result)
        return tokens_cost(price, usage.input_tokens, usage.output_tokens)
    cached = min(usage.cached_tokens, usage.input_tokens)
    audio_in = min(usage.audio_input_tokens, usage.input_tokens - cached)
    image_in = min(usage.image_input_tokens, usage.input_tokens - cached - audio_in)
    text_in = usage.input_tokens - cached - audio_in - image_in
    audio_out = min(usage.audio_output_tokens, usage.output_tokens)
    text_out = usage.output_tokens - audio_out
    per_token = (
        text_in * price.input
        + cached * _or(price.cached_input, price.input)
        + audio_in * _or(price.audio_input, price.input)
        + image_in * _or(price.image_input, price.input)
        + text_out * price.output
        + audio_out * _or(price.audio_output, price.output)
    ) / 1e6
    return per_token + usage.seconds / 60 * price.per_minute + price.per_request


def tokens_cost(price: Price, input_tokens: int, output_tokens: int) -> float:
    """USD for text tokens only: cost_of with no cached, audio or image tokens."""
    return (input_tokens * price.input + output_tokens * price.output) / 1e6 + price.per_request


def output_price(price: Price) -> float:
    """USD per million output tokens at the dearest output rate (audio output may cost more than text)."""
    return price.output if price.audio_output is None else max(price.output, price.audio_output)


def _or(value: float | None, fallback: float) -> float:
    return fallback if value is None else value


class PriceTable:
    """The shipped price list, by provider and model."""

    def __init__(self, data: dict):
        self._prices = {
            provider: {model: price_from_dict(p) for model, p in models.items()}
            for provider, models in data.items() if not provider.startswith("_")
        }

    @classmethod
    def shipped(cls) -> "PriceTable":
        """The table in aipipe/pricing.json."""
        return cls(json.loads(resources.files("aipipe").joinpath("pricing.json").read_text()))

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
