"""A fake OpenAI / OpenRouter server speaking their real wire formats, for tests on loopback.

Tests steer it through `FakeState` (same process): status codes, delays, a gate that holds answers until
the test opens it, how streams are cut into network writes, \\r\\n\\r\\n separators, and it records every
request it received.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import orjson
import tornado.web
from tornado.httputil import parse_body_arguments

from .fake_anthropic import anthropic_routes
from .fake_gemini import GeminiHandler, gemini_routes

OPERATOR_KEYS = {"openai": "sk-test-openai-operator", "openrouter": "sk-or-test-operator"}
REPLY = "Hello from the fake — ünïcödé ✓ 你好"  # multi-byte characters on purpose

OPENROUTER_MODELS = [
    {"id": "openai/gpt-4o-mini", "name": "OpenAI: GPT-4o-mini",
     "pricing": {"prompt": "0.00000015", "completion": "0.0000006", "request": "0", "image": "0",
                 "web_search": "0", "internal_reasoning": "0", "input_cache_read": "0.000000075"}},
    {"id": "anthropic/claude-sonnet-4", "name": "Anthropic: Claude Sonnet 4",
     "pricing": {"prompt": "0.000003", "completion": "0.000015", "request": "0", "image": "0.0048"}},
    {"id": "meta-llama/llama-3.3-70b-instruct:free", "name": "Llama 3.3 70B (free)",
     "pricing": {"prompt": "0", "completion": "0", "request": "0", "image": "0"}},
]


@dataclass
class FakeState:
    """What the fake does next, and what it has seen."""

    status: int = 200
    delay: float = 0.0  # seconds before answering
    event_delay: float = 0.0  # seconds between stream events
    split: int = 0  # >0: write streams in pieces of this many bytes, flushing each
    crlf: bool = False  # separate events with \r\n\r\n
    prompt_tokens: int = 12
    completion_tokens: int = 7
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    openrouter_cost: float | None = 0.000123
    events: int = 5  # content chunks per stream
    omit_usage: bool = False
    models_delay: float = 0.0  # seconds OpenRouter's model list takes to answer
    embeddings_edit: object = None  # a function(answer dict) -> the embeddings answer to send instead
    script: list[bytes] | None = None  # a stream answer sent as given, one flushed write per piece (play_script)
    script_type: str = "text/event-stream"
    cache_write_tokens: int = 0  # Anthropic: 5-minute cache writes
    cache_write_1h_tokens: int = 0  # Anthropic: 1-hour cache writes
    web_searches: int = 0  # Anthropic: server_tool_use.web_search_requests
    anthropic_delta_input: bool = True  # message_delta repeats the input and cache counts (the current API does)
    anthropic_error_after: int | None = None  # send an `error` event after this many events instead of finishing
    requests: list = field(default_factory=list)
    models_fetches: int = 0
    # when given, OpenAI / OpenRouter answers wait (after `delay`) until it is set: calls stay in flight exactly
    # as long as a test needs, however slow the machine; an answer still waiting after gate_timeout seconds is a 500
    gate: asyncio.Event | None = None
    gate_timeout: float = 60.0

    @property
    def last(self) -> dict:
        return self.requests[-1]


class FakeHandler(tornado.web.RequestHandler):
    SUPPORTED_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD")

    def initialize(self, state: FakeState, provider: str) -> None:
        self.state, self.provider = state, provider

    async def prepare(self) -> None:
        self.state.requests.append({
            "provider": self.provider, "method": self.request.method, "path": self.request.path,
            "query": self.request.query, "headers": dict(self.request.headers.get_all()), "body": self.request.body,
            "peer": self.request.connection.context.address,
        })
        if self.state.delay:
            await asyncio.sleep(self.state.delay)
        if self.state.gate is not None:
            await asyncio.wait_for(self.state.gate.wait(), self.state.gate_timeout)
        if self.state.script is not None and self.request.method == "POST" and b'"stream":true' in self.request.body \
                and self.check_key():
            await play_script(self, self.state)

    def check_key(self) -> bool:
        auth = self.request.headers.get("Authorization", "")
        if self.state.status in (401, 403) or auth not in (f"Bearer {OPERATOR_KEYS[self.provider]}", "Bearer sk-user-native-key"):
            self.set_status(self.state.status if self.state.status in (401, 403) else 401)
            self.finish({"error": {"message": f"Incorrect API key provided: {auth[7:12]}****", "type": "invalid_request_error",
                                   "code": "invalid_api_key"}})
            return False
        if self.state.status != 200:
            self.set_status(self.state.status)
            self.finish({"error": {"message": "The server had an error while processing your request.", "type": "server_error"}})
            return False
        return True

    def usage(self) -> dict:
        s = self.state
        u = {"prompt_tokens": s.prompt_tokens, "completion_tokens": s.completion_tokens,
             "total_tokens": s.prompt_tokens + s.completion_tokens,
             "prompt_tokens_details": {"cached_tokens": s.cached_tokens, "audio_tokens": 0},
             "completion_tokens_details": {"reasoning_tokens": s.reasoning_tokens, "audio_tokens": 0}}
        if self.provider == "openrouter" and s.openrouter_cost is not None:
            u["cost"] = s.openrouter_cost
        return u

    async def stream(self, events: list[bytes]) -> None:
        self.set_header("Content-Type", "text/event-stream; charset=utf-8")
        self.set_header("Cache-Control", "no-cache")
        sep = b"\r\n\r\n" if self.state.crlf else b"\n\n"
        for i, event in enumerate(events):
            data = (event.replace(b"\n", b"\r\n") if self.state.crlf else event) + sep
            pieces = [data[j:j + self.state.split] for j in range(0, len(data), self.state.split)] if self.state.split else [data]
            for piece in pieces:
                self.write(piece)
                await self.flush()
                if self.state.split:
                    await asyncio.sleep(0.001)
            if self.state.event_delay and i < len(events) - 1:
                await asyncio.sleep(self.state.event_delay)
        self.finish()


async def play_script(handler: tornado.web.RequestHandler, state: FakeState) -> None:
    """Answer with state.script, one flushed write per piece (a test chooses the bytes and where reads split)."""
    handler.set_header("Content-Type", state.script_type)
    for piece in state.script:
        handler.write(piece)
        await handler.flush()
        await asyncio.sleep(0.001)
    handler.finish()


class ScriptedGemini(GeminiHandler):
    """Gemini, playing state.script instead of its own stream when a test set one."""

    async def prepare(self) -> None:
        await super().prepare()
        if self.state.script is not None and self.request.path.endswith(":streamGenerateContent") and not self.refuse():
            await play_script(self, self.state)


async def arrived(state: FakeState, n: int, answered: Callable[[], int] = lambda: 0, tries: int = 600) -> None:
    """Wait until n requests reached the fake in all, counting `answered()` more that were answered before
    reaching it (refused by the gateway); polls every 50 ms, at most `tries` times, then AssertionError."""
    for _ in range(tries):
        if len(state.requests) + answered() >= n:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{len(state.requests)} requests reached the fake and {answered()} were answered; expected {n}")


async def open_gate_once_decided(state: FakeState, n: int, answered: Callable[[], int]) -> None:
    """Open state.gate once each of n requests has been decided: reached the fake (admitted; the gate holds it
    there) or already answered without it. Opens it even if that never happens, so nothing waits on it."""
    try:
        await arrived(state, n, answered)
    finally:
        state.gate.set()


def sse(obj) -> bytes:
    return b"data: " + (obj if isinstance(obj, bytes) else orjson.dumps(obj))


class ChatHandler(FakeHandler):
    async def post(self) -> None:
        if not self.check_key():
            return
        body = orjson.loads(self.request.body)
        model = body.get("model", "")
        base = {"id": "chatcmpl-fake1", "created": int(time.time()), "model": model + ("" if "/" in model else "-2024-07-18"),
                "system_fingerprint": "fp_fake"}
        if not body.get("stream"):
            self.set_header("Content-Type", "application/json")
            self.set_header("openai-organization", "operator-org-secret")
            self.set_header("x-request-id", "req_fake")
            self.set_header("alt-svc", 'h3=":443"; ma=86400')  # as OpenAI's edge sends: about its origin, not ours
            self.set_header("strict-transport-security", "max-age=31536000; includeSubDomains; preload")
            self.set_header("Server", "cloudflare")
            self.set_header("CF-RAY", "8f1a2b3c4d5e6f70-SJC")
            self.set_header("cf-cache-status", "DYNAMIC")
            self.set_header("x-envoy-upstream-service-time", "352")
            out = {**base, "object": "chat.completion",
                   "choices": [{"index": 0, "message": {"role": "assistant", "content": REPLY, "refusal": None},
                                "logprobs": None, "finish_reason": "stop"}]}
            if not self.state.omit_usage:
                out["usage"] = self.usage()
            self.finish(orjson.dumps(out))
            return
        include = (body.get("stream_options") or {}).get("include_usage") or self.provider == "openrouter"
        chunk = {**base, "object": "chat.completion.chunk"}
        if include and self.provider == "openai":
            chunk["usage"] = None
        parts = [REPLY[i::self.state.events] for i in range(self.state.events)]  # any split works for tests
        events = [b": OPENROUTER PROCESSING"] if self.provider == "openrouter" else []
        events.append(sse({**chunk, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}))
        events += [sse({**chunk, "choices": [{"index": 0, "delta": {"content": p}, "finish_reason": None}]}) for p in parts]
        events.append(sse({**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}))
        if include and not self.state.omit_usage:
            events.append(sse({**chunk, "choices": [], "usage": self.usage()}))
        events.append(b"data: [DONE]")
        await self.stream(events)


class ResponsesHandler(FakeHandler):
    async def post(self) -> None:
        if not self.check_key():
            return
        body = orjson.loads(self.request.body)
        s = self.state
        usage = {"input_tokens": s.prompt_tokens, "input_tokens_details": {"cached_tokens": s.cached_tokens},
                 "output_tokens": s.completion_tokens, "output_tokens_details": {"reasoning_tokens": s.reasoning_tokens},
                 "total_tokens": s.prompt_tokens + s.completion_tokens}
        response = {"id": "resp_fake", "object": "response", "created_at": int(time.time()), "status": "completed",
                    "model": body.get("model", "") + "-2024-07-18",
                    "output": [{"type": "message", "id": "msg_fake", "status": "completed", "role": "assistant",
                                "content": [{"type": "output_text", "text": REPLY, "annotations": []}]}],
                    "usage": usage}
        if not body.get("stream"):
            self.set_header("Content-Type", "application/json")
            self.finish(orjson.dumps(response))
            return
        created = {**response, "status": "in_progress", "output": [], "usage": None}
        events = [b"event: response.created\n" + sse({"type": "response.created", "sequence_number": 0, "response": created})]
        for i, ch in enumerate(REPLY.split(" ")):
            events.append(b"event: response.output_text.delta\n" + sse(
                {"type": "response.output_text.delta", "item_id": "msg_fake", "output_index": 0, "content_index": 0,
                 "delta": ch + " ", "sequence_number": i + 1}))
        events.append(b"event: response.completed\n" + sse({"type": "response.completed", "sequence_number": 99, "response": response}))
        await self.stream(events)


class EmbeddingsHandler(FakeHandler):
    async def post(self) -> None:
        if not self.check_key():
            return
        body = orjson.loads(self.request.body)
        inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
        data = [{"object": "embedding", "index": i, "embedding": [((i * 7 + k) % 11) / 10 - 0.5 for k in range(8)]}
                for i in range(len(inputs))]
        tokens = sum(max(1, len(str(t)) // 4) for t in inputs)
        answer = {"object": "list", "data": data, "model": body.get("model"),
                  "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
        if self.state.embeddings_edit is not None:
            answer = self.state.embeddings_edit(answer)
        self.set_header("Content-Type", "application/json")
        self.finish(orjson.dumps(answer))


class SpeechHandler(FakeHandler):
    async def post(self) -> None:
        if not self.check_key():
            return
        self.set_header("Content-Type", "audio/mpeg")
        self.finish(b"ID3" + bytes(range(256)) * 40)


class TranscriptionHandler(FakeHandler):
    async def post(self) -> None:
        if not self.check_key():
            return
        args, files = {}, {}
        parse_body_arguments(self.request.headers["Content-Type"], self.request.body, args, files)
        self.set_header("Content-Type", "application/json")
        self.finish(orjson.dumps({"text": f"heard {len(files['file'][0]['body'])} bytes with {args['model'][0].decode()}",
                                  "usage": {"type": "duration", "seconds": 90}}))


class ModelsHandler(FakeHandler):
    async def get(self) -> None:
        self.set_header("Content-Type", "application/json")
        if self.provider == "openrouter":
            self.state.models_fetches += 1
            if self.state.models_delay:
                await asyncio.sleep(self.state.models_delay)
            self.finish(orjson.dumps({"data": OPENROUTER_MODELS}))
        else:
            self.finish(orjson.dumps({"object": "list", "data": [
                {"id": m, "object": "model", "created": 1700000000, "owned_by": "system"}
                for m in ("gpt-4o-mini", "gpt-4.1-nano", "text-embedding-3-small")]}))


class EchoHandler(FakeHandler):
    """Anything else: echo what arrived, so tests can see exactly what was forwarded."""

    def any(self, *args) -> None:
        if self.request.path.endswith("/no-content"):  # an answer without a body, as DELETEs often are
            self.set_status(204)
            self.finish()
            return
        self.set_header("Content-Type", "application/json")
        self.finish(orjson.dumps(self.state.last | {"body": self.request.body.decode("utf-8", "replace")}))

    get = head = post = put = patch = delete = any


def make_fake_app(state: FakeState) -> tornado.web.Application:
    """Routes for /v1/... of OpenAI and /api/v1/... of OpenRouter."""
    routes = [(pattern, ScriptedGemini if handler is GeminiHandler else handler, deps)
              for pattern, handler, deps in gemini_routes(state)]  # /v1beta/...; the OpenAI catch-all /.* must stay last
    routes += anthropic_routes(state)  # /anthropic-api/v1/...
    for provider, prefix in (("openrouter", "/api"), ("openai", "")):  # longer prefix first
        deps = {"state": state, "provider": provider}
        routes += [
            (prefix + r"/v1/chat/completions", ChatHandler, deps),
            (prefix + r"/v1/responses", ResponsesHandler, deps),
            (prefix + r"/v1/embeddings", EmbeddingsHandler, deps),
            (prefix + r"/v1/audio/speech", SpeechHandler, deps),
            (prefix + r"/v1/audio/transcriptions", TranscriptionHandler, deps),
            (prefix + r"/v1/models", ModelsHandler, deps),
            (prefix + r"/.*", EchoHandler, deps),
        ]
    return tornado.web.Application(routes)
