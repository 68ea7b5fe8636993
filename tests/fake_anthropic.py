"""A fake Anthropic Messages API speaking its real wire format, mounted on the fake upstream under /anthropic-api.

POST /v1/messages answers a Message (JSON), or with "stream": true named server-sent events: message_start
(whose message carries the input and cache counts and output_tokens 1), content_block_start, ping,
content_block_delta (text_delta), content_block_stop, message_delta (cumulative output_tokens, and, as the
current API does, the input and cache counts again unless `anthropic_delta_input` is off), message_stop.
Errors are {"type": "error", "error": {"type", "message"}} with the API's status codes, or an `error` event
mid-stream. count_tokens answers {"input_tokens"}; /v1/models lists models. It shares the OpenAI fake's
FakeState: prompt_tokens are the uncached input, completion_tokens the output.
"""
from __future__ import annotations

import asyncio

import orjson
import tornado.web

ANTHROPIC_KEYS = ("sk-ant-test-operator", "sk-ant-user-native-key")
ANTHROPIC_REPLY = "Claude fake says hi — ünïcödé ✓ 안녕"
PREFIX = "/anthropic-api"  # where the tests' [providers.anthropic] base_url points on the fake upstream


def anthropic_error(kind: str, message: str) -> dict:
    return {"type": "error", "error": {"type": kind, "message": message}, "request_id": "req_fake0123"}


class AnthropicHandler(tornado.web.RequestHandler):
    """Records every request, checks its key and version the way the API does."""

    SUPPORTED_METHODS = ("GET", "POST")

    def initialize(self, state) -> None:
        self.state = state

    async def prepare(self) -> None:
        self.state.requests.append({
            "provider": "anthropic", "method": self.request.method, "path": self.request.path,
            "query": self.request.query, "headers": dict(self.request.headers.get_all()), "body": self.request.body,
        })
        if self.state.delay:
            await asyncio.sleep(self.state.delay)
        self.set_header("request-id", "req_fake0123")

    def refuse(self) -> bool:
        """Answer the API's error for a bad key, a missing version or a steered status; True if it did."""
        headers, status = self.request.headers, self.state.status
        if status in (401, 403) or headers.get("x-api-key") not in ANTHROPIC_KEYS:
            return self.fail(401, "authentication_error", "invalid x-api-key")
        if not headers.get("anthropic-version"):
            return self.fail(400, "invalid_request_error", "anthropic-version: header is required")
        if status == 529:
            return self.fail(529, "overloaded_error", "Overloaded")
        if status != 200:
            return self.fail(status, "api_error", "Internal server error")
        return False

    def fail(self, status: int, kind: str, message: str) -> bool:
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.finish(orjson.dumps(anthropic_error(kind, message)))
        return True

    def usage(self, output_tokens: int) -> dict:
        s = self.state
        written = s.cache_write_tokens + s.cache_write_1h_tokens
        return {"input_tokens": s.prompt_tokens, "cache_creation_input_tokens": written,
                "cache_read_input_tokens": s.cached_tokens,
                "cache_creation": {"ephemeral_5m_input_tokens": s.cache_write_tokens,
                                   "ephemeral_1h_input_tokens": s.cache_write_1h_tokens},
                "output_tokens": output_tokens, "service_tier": "standard",
                "server_tool_use": {"web_search_requests": s.web_searches}}


class MessagesHandler(AnthropicHandler):
    """POST /v1/messages."""

    async def post(self) -> None:
        if self.refuse():
            return
        body = orjson.loads(self.request.body)
        message = {"id": "msg_fake0123", "type": "message", "role": "assistant", "model": body["model"],
                   "content": [], "stop_reason": None, "stop_sequence": None}
        if not body.get("stream"):
            self.set_header("Content-Type", "application/json")
            self.finish(orjson.dumps({**message, "content": [{"type": "text", "text": ANTHROPIC_REPLY}],
                                      "stop_reason": "end_turn", "usage": self.usage(self.state.completion_tokens)}))
            return
        await self.stream(message)

    async def stream(self, message: dict) -> None:
        s = self.state
        self.set_header("Content-Type", "text/event-stream; charset=utf-8")
        self.set_header("Cache-Control", "no-cache")
        start = self.usage(1)
        start.pop("server_tool_use")
        pieces = [ANTHROPIC_REPLY[i::s.events] for i in range(s.events)]
        events = [("message_start", {"type": "message_start", "message": {**message, "usage": start}}),
                  ("content_block_start", {"type": "content_block_start", "index": 0,
                                           "content_block": {"type": "text", "text": ""}}),
                  ("ping", {"type": "ping"})]
        events += [("content_block_delta", {"type": "content_block_delta", "index": 0,
                                            "delta": {"type": "text_delta", "text": p}}) for p in pieces]
        if s.anthropic_error_after is not None:
            events = events[:s.anthropic_error_after] + [
                ("error", anthropic_error("overloaded_error", "Overloaded"))]
        else:
            delta_usage = {"output_tokens": s.completion_tokens}
            if s.anthropic_delta_input:  # as the current API sends it: totals, without message_start's cache split
                full = self.usage(s.completion_tokens)
                delta_usage = {k: full[k] for k in ("input_tokens", "cache_creation_input_tokens",
                                                    "cache_read_input_tokens", "output_tokens", "server_tool_use")}
            events += [("content_block_stop", {"type": "content_block_stop", "index": 0}),
                       ("message_delta", {"type": "message_delta",
                                          "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                                          "usage": delta_usage}),
                       ("message_stop", {"type": "message_stop"})]
        for i, (name, data) in enumerate(events):
            self.write(b"event: " + name.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n")
            await self.flush()
            if s.event_delay and i < len(events) - 1:
                await asyncio.sleep(s.event_delay)
        self.finish()


class CountTokensHandler(AnthropicHandler):
    """POST /v1/messages/count_tokens."""

    async def post(self) -> None:
        if not self.refuse():
            self.set_header("Content-Type", "application/json")
            self.finish(orjson.dumps({"input_tokens": self.state.prompt_tokens}))


class ModelsHandler(AnthropicHandler):
    """GET /v1/models."""

    async def get(self) -> None:
        if self.refuse():
            return
        models = [{"type": "model", "id": "claude-sonnet-4-5-20250929", "display_name": "Claude Sonnet 4.5",
                   "created_at": "2025-09-29T00:00:00Z"},
                  {"type": "model", "id": "claude-haiku-4-5-20251001", "display_name": "Claude Haiku 4.5",
                   "created_at": "2025-10-01T00:00:00Z"}]
        self.set_header("Content-Type", "application/json")
        self.finish(orjson.dumps({"data": models, "has_more": False, "first_id": models[0]["id"],
                                  "last_id": models[-1]["id"]}))


def anthropic_routes(state) -> list:
    """The fake's routes, under PREFIX."""
    deps = {"state": state}
    return [(PREFIX + r"/v1/messages", MessagesHandler, deps),
            (PREFIX + r"/v1/messages/count_tokens", CountTokensHandler, deps),
            (PREFIX + r"/v1/models", ModelsHandler, deps)]
