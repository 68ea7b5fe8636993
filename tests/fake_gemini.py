"""A fake Gemini API (v1beta) speaking its real wire formats, mounted on the fake upstream.

generateContent answers JSON with candidates, usageMetadata and modelVersion; streamGenerateContent
answers server-sent events separated by \\r\\n\\r\\n with `alt=sse`, else one JSON array whose chunks
arrive as they are made; every stream chunk repeats a growing usageMetadata. Embeddings carry no
usage; countTokens answers {totalTokens}. It shares the OpenAI fake's FakeState.
"""
from __future__ import annotations

import asyncio
import math

import orjson
import tornado.web

GEMINI_KEYS = ("AIza-test-gemini-operator", "AIza-user-native-key")
GEMINI_REPLY = "Gemini fake says hi — ünïcödé ✓ こんにちは"


def google_error(code: int, status: str, message: str) -> bytes:
    """Google's error envelope (a refused key carries reason API_KEY_INVALID in its details)."""
    error = {"code": code, "message": message, "status": status}
    if message.startswith("API key not valid"):
        error["details"] = [{"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID",
                             "domain": "googleapis.com", "metadata": {"service": "generativelanguage.googleapis.com"}}]
    return orjson.dumps({"error": error})


class GeminiHandler(tornado.web.RequestHandler):
    """POST /v1beta/models/<model>:<action>."""

    def initialize(self, state) -> None:
        self.state = state

    async def prepare(self) -> None:
        self.state.requests.append({
            "provider": "gemini", "method": self.request.method, "path": self.request.path,
            "query": self.request.query, "headers": dict(self.request.headers.get_all()), "body": self.request.body,
        })
        if self.state.delay:
            await asyncio.sleep(self.state.delay)

    def refuse(self) -> bool:
        """Answer like Google does to missing, wrong or OAuth-style credentials; True when refused."""
        key = self.request.headers.get("x-goog-api-key") or self.get_query_argument("key", "")
        if "Authorization" in self.request.headers:
            error = (401, "UNAUTHENTICATED", "Request had invalid authentication credentials. Expected OAuth 2 access token.")
        elif not key:
            error = (403, "PERMISSION_DENIED", "Method doesn't allow unregistered callers (callers without established identity).")
        elif key not in GEMINI_KEYS:
            error = (400, "INVALID_ARGUMENT", "API key not valid. Please pass a valid API key.")
        elif self.state.status != 200:
            error = (self.state.status, "INTERNAL", "An internal error has occurred.")
        else:
            return False
        self.set_status(error[0])
        self.set_header("Content-Type", "application/json; charset=UTF-8")
        self.finish(google_error(*error))
        return True

    def usage(self, done: float = 1.0) -> dict:
        """usageMetadata after `done` of the answer: prompt and thoughts counted from the start, output growing."""
        s = self.state
        out = round(s.completion_tokens * done)
        meta = {"promptTokenCount": s.prompt_tokens, "candidatesTokenCount": out,
                "totalTokenCount": s.prompt_tokens + out + s.reasoning_tokens,
                "promptTokensDetails": [{"modality": "TEXT", "tokenCount": s.prompt_tokens}]}
        if s.reasoning_tokens:
            meta["thoughtsTokenCount"] = s.reasoning_tokens
        if s.cached_tokens:
            meta["cachedContentTokenCount"] = s.cached_tokens
        return meta

    def answer(self, model: str, text: str, done: float = 1.0, last: bool = True) -> dict:
        candidate = {"content": {"parts": [{"text": text}], "role": "model"}, "index": 0}
        if last:
            candidate["finishReason"] = "STOP"
        out = {"candidates": [candidate], "modelVersion": model, "responseId": "fake-gemini-1"}
        if not self.state.omit_usage:
            out["usageMetadata"] = self.usage(done)
        return out

    async def post(self, model: str, action: str) -> None:
        if self.refuse():
            return
        handler = {"generateContent": self.generate, "streamGenerateContent": self.stream_generate,
                   "embedContent": self.embed, "batchEmbedContents": self.batch_embed,
                   "countTokens": self.count_tokens}.get(action)
        if handler is None:
            self.set_status(404)
            self.finish(google_error(404, "NOT_FOUND", f"Method {action} not found"))
            return
        await handler(model, orjson.loads(self.request.body or b"{}"))

    def send(self, obj) -> None:
        self.set_header("Content-Type", "application/json; charset=UTF-8")
        self.finish(orjson.dumps(obj))

    async def generate(self, model: str, body: dict) -> None:
        self.send(self.answer(model, GEMINI_REPLY))

    async def stream_generate(self, model: str, body: dict) -> None:
        n = self.state.events
        parts = [GEMINI_REPLY[i * len(GEMINI_REPLY) // n:(i + 1) * len(GEMINI_REPLY) // n] for i in range(n)]
        chunks = [self.answer(model, p, (i + 1) / n, i == n - 1) for i, p in enumerate(parts)]
        if self.get_query_argument("alt", "") == "sse":
            self.set_header("Content-Type", "text/event-stream")
            pieces = [b"data: " + orjson.dumps(c) + b"\r\n\r\n" for c in chunks]
        else:  # a JSON array, written chunk by chunk the way Google does
            self.set_header("Content-Type", "application/json; charset=UTF-8")
            bodies = [orjson.dumps(c, option=orjson.OPT_INDENT_2) for c in chunks]
            pieces = [b"[" + bodies[0]] + [b"\n,\r\n" + b for b in bodies[1:]] + [b"\n]"]
        for piece in pieces:
            await self.write_split(piece)
        self.finish()

    async def write_split(self, data: bytes) -> None:
        size = self.state.split or len(data)
        for j in range(0, len(data), size):
            self.write(data[j:j + size])
            await self.flush()
            if self.state.split:
                await asyncio.sleep(0.001)

    @staticmethod
    def vector(text: str) -> list[float]:
        return [((len(text) * 7 + k) % 11) / 10 - 0.5 for k in range(8)]

    async def embed(self, model: str, body: dict) -> None:
        text = "".join(p.get("text", "") for p in body["content"]["parts"])
        self.send({"embedding": {"values": self.vector(text)}})

    async def batch_embed(self, model: str, body: dict) -> None:
        texts = ["".join(p.get("text", "") for p in r["content"]["parts"]) for r in body["requests"]]
        self.send({"embeddings": [{"values": self.vector(t)} for t in texts]})

    async def count_tokens(self, model: str, body: dict) -> None:
        chars = sum(len(p.get("text", "")) for c in body.get("contents", []) for p in c.get("parts", []))
        tokens = math.ceil(chars / 4)
        self.send({"totalTokens": tokens, "promptTokensDetails": [{"modality": "TEXT", "tokenCount": tokens}]})


class GeminiModelsHandler(GeminiHandler):
    """GET /v1beta/models: the model list (free to read)."""

    async def get(self) -> None:
        if self.refuse():
            return
        self.send({"models": [{"name": f"models/{m}", "displayName": m, "supportedGenerationMethods":
                               ["generateContent", "countTokens"]} for m in ("gemini-2.5-flash", "gemini-2.5-pro")]})


def gemini_routes(state) -> list:
    """Routes of the fake Gemini API; they must come before the OpenAI fake's catch-all."""
    deps = {"state": state}
    return [
        (r"/v1beta/models/([^/:]+):(\w+)", GeminiHandler, deps),
        (r"/v1beta/models", GeminiModelsHandler, deps),
    ]
