"""Anthropic: /anthropic/* -> {base_url}/*, the Messages API priced from the shipped table.

The official SDKs work unchanged with base_url=<gateway>/anthropic and an AI Pipe token as their API key:
they send it in x-api-key, which is where the operator's key goes upstream.
"""
from __future__ import annotations

import re
from typing import Any

from ..errors import ApiError
from ..usage import Usage, count
from .base import (MISSING_MODEL, NO_BODY_METHODS, Call, Provider, count_asked, refuse_unpriced_tools, require_price,
                   set_hold)

MESSAGES = "/v1/messages"
FREE_POST = frozenset({"/v1/messages/count_tokens"})  # names a model (so model rules apply) but costs nothing
BATCHES = re.compile(r"/v1/messages/batches(?:/.*)?")
NOT_BATCHED = ("Message batches are not supported here: each request is priced and admitted as it runs, "
               "so send them to /v1/messages one by one")
DEFAULT_WEB_SEARCHES = 10  # searches held for a web_search tool that names no max_uses
HOSTED_TOOLS = ("code_execution",)  # charged by container hour, beyond tokens (web search is priced: per_web_search)


class Anthropic(Provider):
    """Anthropic's Messages API: messages (JSON and named server-sent events), token counting, models."""

    route = name = "anthropic"
    label = "Anthropic"
    default_base_url = "https://api.anthropic.com"
    key_env = "ANTHROPIC_API_KEY"
    forwarded = frozenset({"anthropic-version", "anthropic-beta", "anthropic-dangerous-direct-browser-access"})
    default_headers = {"anthropic-version": "2023-06-01"}  # the API refuses a call without one
    token_headers = ("Authorization", "x-api-key")  # x-api-key is what the SDKs send
    shared_listings = re.compile(r"/v1/(?:files|messages/batches|skills)/?")
    usage_in_parts = True  # message_start has the input and cache counts, message_delta the output so far

    def auth_headers(self, key: str) -> dict[str, str]:
        """Anthropic takes its key in x-api-key."""
        return {"x-api-key": key}

    async def prepare(self, call: Call, gateway) -> None:
        """Price /v1/messages by its model and max_tokens; count_tokens and reads are free; batches are refused."""
        if call.method in NO_BODY_METHODS:
            return  # listing models, reading a batch's results
        if BATCHES.fullmatch(call.path):
            raise ApiError(400, NOT_BATCHED)
        if call.path != MESSAGES and call.path not in FREE_POST:
            raise ApiError(400, f"Anthropic endpoint {call.path} is not supported here")
        model = call.body_model()
        if not model:  # count_tokens too: model rules apply to every call naming a model
            raise ApiError(400, MISSING_MODEL)
        if call.path in FREE_POST:
            call.model = model
            return
        price = require_price(call, gateway.prices.lookup("anthropic", model), model)
        refuse_unpriced_tools(call.data, HOSTED_TOOLS)
        set_hold(call, price, gateway.default_hold, self._searches_held(call.data, price, gateway.default_hold),
                 gateway.config.get("limits.default_max_output_tokens"))

    @staticmethod
    def _searches_held(data: Any, price, default_hold: float) -> float:
        """USD held for web searches: each web_search tool's max_uses, or DEFAULT_WEB_SEARCHES without one."""
        tools = data.get("tools") if isinstance(data, dict) else None
        if not price.per_web_search or not isinstance(tools, list):
            return 0.0
        searches = 0
        for tool in tools:
            if isinstance(tool, dict) and str(tool.get("type", "")).startswith("web_search"):
                # as many as the request allows, however many: a hold below that would let spend pass the limit
                searches += count_asked(tool.get("max_uses"), DEFAULT_WEB_SEARCHES)
        return searches * price.per_web_search

    def answer_usage(self, call: Call, obj: Any) -> Usage | None:
        """Usage of a Message."""
        return self.event_usage(obj)

    def event_usage(self, obj: Any) -> Usage | None:
        """Usage of a Message, of message_start (inside its message) or of message_delta."""
        if not isinstance(obj, dict):
            return None
        u = obj.get("usage")
        if isinstance(u, dict):
            return anthropic_usage(u)
        message = obj.get("message")
        u = message.get("usage") if isinstance(message, dict) else None
        if not isinstance(u, dict):
            return None
        usage = anthropic_usage(u)
        usage.partial = True  # message_start: the output count comes in message_delta
        return usage

    def combine_usage(self, earlier: Usage | None, later: Usage) -> Usage:
        """Each count at the largest figure any event gave: message_delta's counts are cumulative, and it may
        leave out (or, in older API versions, never give) what message_start reported."""
        if earlier is None:
            return later
        # message_delta gives cache writes as one total, without the 5-minute / 1-hour split of message_start
        written = max(earlier.cache_write_tokens + earlier.cache_write_1h_tokens,
                      later.cache_write_tokens + later.cache_write_1h_tokens)
        written_1h = min(max(earlier.cache_write_1h_tokens, later.cache_write_1h_tokens), written)
        return Usage(
            input_tokens=max(earlier.input_tokens, later.input_tokens),
            output_tokens=max(earlier.output_tokens, later.output_tokens),
            cached_tokens=max(earlier.cached_tokens, later.cached_tokens),
            cache_write_tokens=written - written_1h,
            cache_write_1h_tokens=written_1h,
            web_searches=max(earlier.web_searches, later.web_searches),
            partial=earlier.partial and later.partial,
        )


def anthropic_usage(u: dict) -> Usage:
    """Anthropic's usage object as a Usage. Its input_tokens leaves out cache reads and writes, which are billed
    at their own rates; here they are parts of the prompt's total, as every provider's are."""
    fresh, read, written = count(u, "input_tokens"), count(u, "cache_read_input_tokens"), count(
        u, "cache_creation_input_tokens")
    detail = u.get("cache_creation")
    written_1h = min(count(detail, "ephemeral_1h_input_tokens"), written) if isinstance(detail, dict) else 0
    tools = u.get("server_tool_use")
    return Usage(
        input_tokens=fresh + read + written,
        output_tokens=count(u, "output_tokens"),
        cached_tokens=read,
        cache_write_tokens=written - written_1h,
        cache_write_1h_tokens=written_1h,
        web_searches=count(tools, "web_search_requests") if isinstance(tools, dict) else 0,
    )


PROVIDER = Anthropic()
