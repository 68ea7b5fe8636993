"""Prices from the shipped table, computed in one place."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aipipe.pricing import Price, PriceTable, cost_of
from aipipe.usage import Usage, read_usage

TABLE = PriceTable.shipped()


@pytest.mark.parametrize("model,base", [("gpt-4o-mini-2024-07-18", "gpt-4o-mini"), ("gpt-4-0613", "gpt-4"),
                                        ("gpt-4.1-2025-04-14", "gpt-4.1"), ("o3-mini-2025-01-31", "o3-mini")])
def test_dated_snapshots_fall_back_to_base_model(model, base):
    assert TABLE.lookup("openai", model) == TABLE.lookup("openai", base) is not None


@pytest.mark.parametrize("model", ["gpt-9", "", "gpt-4o-mini-extra", None])
def test_unknown_models_have_no_price(model):
    assert TABLE.lookup("openai", model) is None


def test_audio_tokens_use_audio_prices():
    price = TABLE.lookup("openai", "gpt-4o-audio-preview")
    usage = Usage(input_tokens=1000, audio_input_tokens=400, output_tokens=500, audio_output_tokens=300)
    assert cost_of(price, usage) == pytest.approx((600 * 2.5 + 400 * 40 + 200 * 10 + 300 * 80) / 1e6, abs=1e-12)


def test_per_minute_and_per_request_prices():
    assert cost_of(TABLE.lookup("openai", "whisper-1"), Usage(seconds=30)) == pytest.approx(0.003, abs=1e-12)
    assert cost_of(Price(input=1, output=2, per_request=0.005), Usage(input_tokens=10**6)) == pytest.approx(1.005)


def itemised(price: Price, u: Usage) -> float:
    """cost_of's general sum, every term written out (the reference for its text-only shortcut)."""
    cached = min(u.cached_tokens, u.input_tokens)
    audio_in = min(u.audio_input_tokens, u.input_tokens - cached)
    image_in = min(u.image_input_tokens, u.input_tokens - cached - audio_in)
    audio_out = min(u.audio_output_tokens, u.output_tokens)
    fallback = {None: price.input}
    per_token = ((u.input_tokens - cached - audio_in - image_in) * price.input
                 + cached * fallback.get(price.cached_input, price.cached_input)
                 + audio_in * fallback.get(price.audio_input, price.audio_input)
                 + image_in * fallback.get(price.image_input, price.image_input)
                 + (u.output_tokens - audio_out) * price.output
                 + audio_out * (price.output if price.audio_output is None else price.audio_output)) / 1e6
    return per_token + u.seconds / 60 * price.per_minute + price.per_request


money = st.floats(min_value=0, max_value=1000, allow_nan=False)
tokens = st.integers(min_value=0, max_value=10**8)


@settings(deadline=None)  # a loaded CI machine can take longer than the default 200 ms per example
@given(money, money, st.one_of(st.none(), money), money, money, tokens, tokens, st.sampled_from([0, 0, 17]),
       st.sampled_from([0, 0, 5]), st.sampled_from([0.0, 0.0, 12.5]))
def test_cost_of_matches_the_itemised_sum_exactly(inp, out, cached_price, per_minute, per_request, tin, tout,
                                                  cached, audio, seconds):
    """The text-only shortcut gives the same float as the full sum, bit for bit, and the full sum is used otherwise."""
    price = Price(input=inp, output=out, cached_input=cached_price, per_minute=per_minute, per_request=per_request)
    usage = Usage(input_tokens=tin, output_tokens=tout, cached_tokens=cached, audio_output_tokens=audio, seconds=seconds)
    assert cost_of(price, usage) == itemised(price, usage)


def test_usage_spellings():
    assert read_usage({"usage": {"input_tokens": 3, "output_tokens": 4}, "model": "m"}) == Usage(3, 4, model="m")
    assert read_usage({"type": "response.completed", "response": {"model": "m", "usage": {"input_tokens": 5, "output_tokens": 6}}}) \
        == Usage(5, 6, model="m")
    gemini = read_usage({"usageMetadata": {"promptTokenCount": 7, "candidatesTokenCount": 8, "thoughtsTokenCount": 2},
                         "modelVersion": "gemini-2.5-flash"})
    assert (gemini.input_tokens, gemini.output_tokens, gemini.model) == (7, 10, "gemini-2.5-flash")
    assert read_usage({"usage": None, "choices": []}) is None
    assert read_usage([1, 2]) is None


def test_negative_or_odd_counts_never_credit_the_user():
    usage = read_usage({"usage": {"prompt_tokens": -1000, "completion_tokens": -5.0, "prompt_tokens_details":
                                  {"cached_tokens": -3, "audio_tokens": True}}})
    assert (usage.input_tokens, usage.output_tokens, usage.cached_tokens, usage.audio_input_tokens) == (0, 0, 0, 0)
    assert cost_of(TABLE.lookup("openai", "gpt-4o-mini"), usage) == 0
    gemini = read_usage({"usageMetadata": {"promptTokenCount": -7, "candidatesTokenCount": 4}})
    assert (gemini.input_tokens, gemini.output_tokens) == (0, 4)


@pytest.mark.parametrize("provider,model,most", [
    ("openai", "gpt-4o-mini-2024-07-18", 16384), ("openai", "gpt-4.1", 32768), ("openai", "o4-mini", 100000),
    ("openai", "gpt-5", 128000), ("gemini", "gemini-2.5-flash", 65536), ("gemini", "gemini-2.5-pro", 65536),
    ("openai", "gpt-4-32k", 0)])  # 0: not known, limits.default_max_output_tokens applies
def test_the_table_ships_each_models_maximum_output(provider, model, most):
    price = TABLE.lookup(provider, model)
    assert price.max_output == most and type(price.max_output) is int


def test_a_long_prompt_entry_becomes_the_models_price_above_its_threshold():
    price = TABLE.lookup("gemini", "gemini-2.5-pro")
    assert TABLE.lookup("gemini", "gemini-2.5-pro>200k") is None  # not a model of its own
    assert (price.long_above, price.long.input, price.long.output, price.long.max_output) == (200_000, 2.5, 15, 65536)
    at_threshold = cost_of(price, Usage(input_tokens=200_000, output_tokens=1000))
    above = cost_of(price, Usage(input_tokens=200_001, output_tokens=1000))
    assert abs(at_threshold - (200_000 * 1.25 + 1000 * 10) / 1e6) < 1e-9
    assert abs(above - (200_001 * 2.5 + 1000 * 15) / 1e6) < 1e-9
