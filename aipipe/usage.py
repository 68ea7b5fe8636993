"""Reading token usage out of provider answers, whatever spelling the provider uses."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass

import orjson


MAX_COUNT = 2**53  # tokens or characters no answer reaches; above it a float price would lose precision


@dataclass(slots=True)  # not frozen: a frozen dataclass takes three times as long to create
class Usage:
    """Token counts of one call; subsets (cached, audio, image, reasoning) are included in the totals."""

    input_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0  # cache reads
    cache_write_tokens: int = 0  # prompt-cache writes (Anthropic's 5-minute cache)
    cache_write_1h_tokens: int = 0  # 1-hour cache writes
    audio_input_tokens: int = 0
    audio_output_tokens: int = 0
    image_input_tokens: int = 0
    reasoning_tokens: int = 0
    seconds: float = 0.0  # audio duration, for per-minute models
    web_searches: int = 0  # searches the provider ran and bills per search
    cost: float | None = None  # USD the provider itself reported (OpenRouter)
    model: str = ""
    partial: bool = False  # a report the provider completes in a later event (Anthropic's message_start)

    def past_belief(self) -> bool:
        """Whether a count is past any real answer (MAX_COUNT): such usage cannot be trusted, nor priced."""
        return max(self.input_tokens, self.output_tokens, self.cached_tokens, self.cache_write_tokens,
                   self.cache_write_1h_tokens, self.audio_input_tokens, self.audio_output_tokens,
                   self.image_input_tokens, self.web_searches) >= MAX_COUNT


def parse_answer(data: bytes):
    """A provider's JSON (an answer or an event's data), or None when it is not JSON.

    orjson refuses NaN, Infinity and numbers too large for a float, which Python's json (and so a provider
    written in Python) writes; such an answer is read again with the json module rather than losing its usage,
    and the odd numbers are then judged where they are read (never a credit)."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        pass
    try:
        return json.loads(data)
    except (ValueError, RecursionError):
        return None


def count(d: dict | None, *keys: str) -> int:
    """The first of keys that holds a number, as a count: 0 when absent, negative or NaN (a credit is never
    billed); MAX_COUNT for a count past any real answer, which the caller then prices as it would an answer
    whose usage it cannot trust (providers.base: the call's hold)."""
    if not isinstance(d, dict):
        return 0
    for k in keys:
        v = d.get(k)
        if v.__class__ is int:  # the usual case, tested first (bool, a subclass of int, is not a count)
            return v if 0 < v < MAX_COUNT else MAX_COUNT if v > 0 else 0
        if isinstance(v, float) or (isinstance(v, int) and not isinstance(v, bool)):
            return int(v) if 0 < v < MAX_COUNT else MAX_COUNT if v >= MAX_COUNT else 0  # NaN > x is False: 0
    return 0


def _model_of(obj: dict) -> str:
    model = obj.get("model") or obj.get("modelVersion")
    if not model and isinstance(obj.get("response"), dict):
        model = obj["response"].get("model")
    return model if isinstance(model, str) else ""


def read_usage(obj) -> Usage | None:
    """Usage from an OpenAI, Responses API, OpenRouter or Gemini JSON object; None if it has none."""
    if not isinstance(obj, dict):
        return None
    u = obj.get("usage")
    if not isinstance(u, dict) and isinstance(obj.get("response"), dict):
        u = obj["response"].get("usage")  # Responses API stream: response.completed
    if isinstance(u, dict):
        return _openai_usage(u, _model_of(obj))
    meta = obj.get("usageMetadata")
    if isinstance(meta, dict):
        return _gemini_usage(meta, _model_of(obj))
    return None


def _openai_usage(u: dict, model: str) -> Usage:
    given, made = u.get("prompt_tokens"), u.get("completion_tokens")
    if (given.__class__ is int and made.__class__ is int and 0 <= given < MAX_COUNT
            and 0 <= made < MAX_COUNT):  # Chat Completions' usual case
        usage = Usage(given, made, model=model)
    else:
        usage = Usage(count(u, "prompt_tokens", "input_tokens"), count(u, "completion_tokens", "output_tokens"), model=model)
    details = u.get("prompt_tokens_details") or u.get("input_tokens_details") or u.get("input_token_details")
    if isinstance(details, dict):
        usage.cached_tokens = count(details, "cached_tokens")
        usage.audio_input_tokens = count(details, "audio_tokens")
        usage.image_input_tokens = count(details, "image_tokens")
    details = u.get("completion_tokens_details") or u.get("output_tokens_details")
    if isinstance(details, dict):
        usage.audio_output_tokens = count(details, "audio_tokens")
        usage.reasoning_tokens = count(details, "reasoning_tokens")
    if u.get("type") == "duration":  # Whisper's usage for audio it was sent
        seconds = u.get("seconds")
        if isinstance(seconds, (int, float)) and not isinstance(seconds, bool) and 0 < seconds < math.inf:
            usage.seconds = float(seconds)
    cost = u.get("cost")  # OpenRouter's own figure
    # a negative, infinite or NaN figure is no figure: the tokens are priced instead (never a credit)
    if isinstance(cost, (int, float)) and not isinstance(cost, bool) and 0 <= cost < math.inf:
        usage.cost = float(cost)
    return usage


def _modality_tokens(details, modality: str) -> int:
    """Tokens of one modality in Gemini's [{modality, tokenCount}] lists."""
    if not isinstance(details, list):
        return 0
    return sum(count(d, "tokenCount") for d in details if isinstance(d, dict) and d.get("modality") == modality)


def _gemini_usage(meta: dict, model: str) -> Usage:
    # thoughtsTokenCount is billed as output but not counted in candidatesTokenCount
    return Usage(
        input_tokens=count(meta, "promptTokenCount"),
        output_tokens=count(meta, "candidatesTokenCount") + count(meta, "thoughtsTokenCount"),
        cached_tokens=count(meta, "cachedContentTokenCount"),
        audio_input_tokens=_modality_tokens(meta.get("promptTokensDetails"), "AUDIO"),
        audio_output_tokens=_modality_tokens(meta.get("candidatesTokensDetails"), "AUDIO"),
        reasoning_tokens=count(meta, "thoughtsTokenCount"),
        model=model,
    )
