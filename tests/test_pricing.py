"""Prices from the shipped table, computed in one place."""
from __future__ import annotations

import pytest

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


def test_usage_spellings():
    assert read_usage({"usage": {"input_tokens": 3, "output_tokens": 4}, "model": "m"}) == Usage(3, 4, model="m")
    assert read_usage({"type": "response.completed", "response": {"model": "m", "usage": {"input_tokens": 5, "output_tokens": 6}}}) \
        == Usage(5, 6, model="m")
    gemini = read_usage({"usageMetadata": {"promptTokenCount": 7, "candidatesTokenCount": 8, "thoughtsTokenCount": 2},
                         "modelVersion": "gemini-2.5-flash"})
    assert (gemini.input_tokens, gemini.output_tokens, gemini.model) == (7, 10, "gemini-2.5-flash")
    assert read_usage({"usage": None, "choices": []}) is None
    assert read_usage([1, 2]) is None
