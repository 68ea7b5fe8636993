"""Budget rules that name the models their users may call: 403 before anything is sent, on every endpoint."""
from __future__ import annotations

import orjson
import pytest

from aipipe.budget import model_allowed
from aipipe.config import ConfigError, build_config

from .conftest import ENV, token
from .helpers import chat, message, spent

pytestmark = pytest.mark.every_gateway  # over each store and admission (conftest.GATEWAY_MODES)

RULES = {"@students.example.edu": {"limit": 2, "days": 7,
                                   "models": ["gpt-4o-mini", "openai/*", "claude-haiku-*", "gemini-*-flash*",
                                              "text-embedding-3-*"]}}
STUDENT = "ada@students.example.edu"
# the same without "openai/*", which admits every model of /openai/
NARROW = {"@students.example.edu": {**RULES["@students.example.edu"],
                                    "models": ["gpt-4o-mini", "claude-haiku-*", "gemini-*-flash*", "text-embedding-3-*"]}}


@pytest.mark.parametrize("provider,model,allowed", [
    ("openai", "gpt-4o-mini", True), ("openai", "gpt-4o", True),  # openai/* names the provider
    ("openrouter", "openai/gpt-4o", True), ("openrouter", "anthropic/claude-sonnet-4", False),
    ("anthropic", "claude-haiku-4-5-20251001", True), ("anthropic", "CLAUDE-HAIKU-4-5", True),
    ("anthropic", "claude-sonnet-4-5", False), ("gemini", "gemini-2.5-flash", True),
    ("gemini", "gemini-2.5-flash-lite", True), ("gemini", "gemini-2.5-pro", False),
])
def test_patterns_match_the_model_as_named_or_with_its_provider(provider, model, allowed):
    assert model_allowed(tuple(RULES["@students.example.edu"]["models"]), provider, model) is allowed


@pytest.mark.parametrize("models", ["gpt-4o", [1], [""], ["  "], {"a": 1}])
def test_a_rule_with_bad_models_is_refused_at_load(models):
    with pytest.raises(ConfigError, match=r'budget\."@x.org"\.models must be a list of model patterns'):
        build_config({"budget": {"@x.org": {"limit": 1, "models": models}}}, ENV)


@pytest.mark.gen_test
async def test_a_model_outside_the_rule_is_403_before_anything_is_sent_on_every_endpoint(make_gateway, serve, call,
                                                                                          upstream):
    url = serve(await make_gateway(budget=NARROW))
    t = token(STUDENT)
    refused = [
        ("/openai/v1/chat/completions", chat("gpt-4.1"), {}),
        ("/openai/v1/embeddings", {"model": "text-embedding-ada-002", "input": "x"}, {}),
        ("/openrouter/v1/chat/completions", chat("anthropic/claude-sonnet-4"), {}),
        ("/anthropic/v1/messages", {"model": "claude-sonnet-4-5", "max_tokens": 5, "messages": []}, {}),
        ("/anthropic/v1/messages/count_tokens", {"model": "claude-sonnet-4-5", "messages": []}, {}),  # free, but named
        ("/geminiv1beta/models/gemini-2.5-pro:generateContent", {"contents": []}, {}),
        ("/similarity", {"docs": ["a", "b"], "model": "text-embedding-ada-002"}, {}),
    ]
    for path, body, headers in refused:
        r = await call(url + path, "POST", json=body, token=t, headers=headers)
        name = body.get("model") or path.split("/models/")[1].split(":")[0]
        assert r.code == 403 and message(r) == f"Model {name} is not allowed for you", path
        assert r.headers["Access-Control-Allow-Origin"] == "*"
    # nothing was sent but OpenRouter's price list, read to price the call
    assert [r["path"] for r in upstream.state.requests] == ["/api/v1/models"]
    allowed = await call(url + "/openai/v1/chat/completions", "POST", json=chat("gpt-4o-mini"), token=t)
    assert allowed.code == 200
    similar = await call(url + "/similarity", "POST", json={"docs": ["a", "b"]}, token=t)  # text-embedding-3-small
    assert similar.code == 200
    listing = await call(url + "/openai/v1/models", token=t)  # names no model: not a model call
    assert listing.code == 200


@pytest.mark.gen_test
async def test_usage_lists_the_patterns_and_others_are_unrestricted(make_gateway, serve, call):
    gw = await make_gateway(budget=RULES)
    url = serve(gw)
    student = orjson.loads((await call(url + "/usage", token=token(STUDENT))).body)
    assert student["allowed_models"] == RULES["@students.example.edu"]["models"] and student["limit"] == 2
    by_model = orjson.loads((await call(url + "/usage?by=model", token=token(STUDENT))).body)
    assert by_model["allowed_models"] == student["allowed_models"] and by_model["models"] == []  # both, apart
    other = orjson.loads((await call(url + "/usage", token=token("staff@example.com"))).body)
    assert other["allowed_models"] is None
    r = await call(url + "/openai/v1/chat/completions", "POST", json=chat("gpt-4.1"), token=token("staff@example.com"))
    assert r.code == 200
    assert await spent(gw, "staff@example.com") > 0


@pytest.mark.gen_test
async def test_a_native_key_is_not_held_to_the_rules(make_gateway, serve, call, upstream):
    url = serve(await make_gateway(budget={"*": {"limit": 1, "models": ["gpt-4o-mini"]}}))
    r = await call(url + "/openai/v1/chat/completions", "POST", json=chat("gpt-4.1"),
                   headers={"Authorization": "Bearer sk-user-native-key"})
    assert r.code == 200 and len(upstream.state.requests) == 1
