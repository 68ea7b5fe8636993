"""Shared by the fuzz, fault and soak tests: provider streams built from usage numbers, the usage and price a
gateway should read from them, and a one-shot scripted provider on loopback for faults below HTTP.

The streams speak the providers' real wire formats (OpenAI chat completion chunks with the usage-only chunk,
Responses API events, Gemini `alt=sse` with a growing usageMetadata, OpenRouter with `: OPENROUTER PROCESSING`
comments and `usage.cost`); each stream is a list of raw events, terminators included, so a test can take out
exactly the usage-only chunk the gateway hides.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import orjson

from aipipe.pricing import PriceTable, cost_of
from aipipe.providers.openrouter import price_from_pricing
from aipipe.usage import Usage

from .fake_upstream import OPENROUTER_MODELS

PRICES = PriceTable.shipped()
OPENAI_MODEL = "gpt-4o-mini"
GEMINI_MODEL = "gemini-2.5-flash"
OPENROUTER_MODEL = "openai/gpt-4o-mini"


@dataclass
class Sent:
    """Usage numbers a fake provider reports for one call."""

    prompt: int
    completion: int
    cached: int = 0
    reasoning: int = 0
    cost: float | None = None  # OpenRouter's own figure


@dataclass
class Stream:
    """A provider's answer as raw events, which of them is the usage-only chunk, and the usage it reports."""

    events: list[bytes]
    usage: Usage | None
    usage_only: int | None = None  # index of the `"choices": []` chunk (hidden only when the gateway asked for it)
    extra: dict = field(default_factory=dict)

    @property
    def body(self) -> bytes:
        return b"".join(self.events)

    def without_usage_only(self) -> bytes:
        return b"".join(e for i, e in enumerate(self.events) if i != self.usage_only)


def _event(obj, sep: bytes, multiline: bool = False, name: bytes = b"") -> bytes:
    """One SSE event: `event:` line if named, `data:` line(s), then the separator (\\n\\n or \\r\\n\\r\\n)."""
    line_end = sep[: len(sep) // 2]
    head = b"event: " + name + line_end if name else b""
    if multiline:  # the JSON over several data: lines, which SSE joins with \n (still valid JSON)
        lines = orjson.dumps(obj, option=orjson.OPT_INDENT_2).split(b"\n")
        return head + line_end.join(b"data: " + line for line in lines) + sep
    return head + b"data: " + orjson.dumps(obj) + sep


def openai_usage(s: Sent) -> dict:
    u = {"prompt_tokens": s.prompt, "completion_tokens": s.completion, "total_tokens": s.prompt + s.completion,
         "prompt_tokens_details": {"cached_tokens": s.cached, "audio_tokens": 0},
         "completion_tokens_details": {"reasoning_tokens": s.reasoning, "audio_tokens": 0}}
    if s.cost is not None:
        u["cost"] = s.cost
    return u


def expected_openai(s: Sent, model: str) -> Usage:
    return Usage(s.prompt, s.completion, cached_tokens=s.cached, reasoning_tokens=s.reasoning, cost=s.cost, model=model)


def openai_chat(s: Sent, texts: list[str], model: str = OPENAI_MODEL + "-2024-07-18", sep: bytes = b"\n\n",
                multiline: bool = False, usage_null: bool = True) -> Stream:
    """An OpenAI chat stream with stream_options.include_usage: `"usage":null` chunks, the usage-only chunk, [DONE]."""
    base = {"id": "chatcmpl-fuzz", "object": "chat.completion.chunk", "created": 1700000000, "model": model,
            "system_fingerprint": "fp_fuzz"}
    if usage_null:
        base["usage"] = None
    events = [_event({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                           "finish_reason": None}]}, sep)]
    events += [_event({**base, "choices": [{"index": 0, "delta": {"content": t}, "finish_reason": None}]}, sep, multiline)
               for t in texts]
    events.append(_event({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}, sep))
    events.append(_event({**base, "choices": [], "usage": openai_usage(s)}, sep, multiline))
    events.append(b"data: [DONE]" + sep)
    return Stream(events, expected_openai(s, model), usage_only=len(events) - 2)


def openrouter_chat(s: Sent, texts: list[str], model: str = OPENROUTER_MODEL, sep: bytes = b"\n\n",
                    comments: int = 2) -> Stream:
    """OpenRouter's stream: comment lines while it waits, chunks without usage, a last chunk with usage and cost."""
    base = {"id": "gen-fuzz", "provider": "OpenAI", "model": model, "object": "chat.completion.chunk",
            "created": 1700000000}
    line_end = sep[: len(sep) // 2]
    events = [b": OPENROUTER PROCESSING" + sep for _ in range(comments)]
    for i, t in enumerate(texts):
        events.append(_event({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": t},
                                                   "finish_reason": None, "native_finish_reason": None}]}, sep))
        if i % 3 == 1:
            events.append(b": OPENROUTER PROCESSING" + line_end + b"data: " + orjson.dumps(
                {**base, "choices": [{"index": 0, "delta": {"content": ""}, "finish_reason": None}]}) + sep)
    events.append(_event({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                               "finish_reason": "stop", "native_finish_reason": "stop"}]}, sep))
    events.append(_event({**base, "choices": [], "usage": openai_usage(s)}, sep))
    events.append(b"data: [DONE]" + sep)
    return Stream(events, expected_openai(s, model), usage_only=len(events) - 2)


def responses_stream(s: Sent, texts: list[str], model: str = OPENAI_MODEL + "-2024-07-18",
                     sep: bytes = b"\n\n") -> Stream:
    """Responses API events, each with its `event:` line; usage only in response.completed."""
    usage = {"input_tokens": s.prompt, "input_tokens_details": {"cached_tokens": s.cached},
             "output_tokens": s.completion, "output_tokens_details": {"reasoning_tokens": s.reasoning},
             "total_tokens": s.prompt + s.completion}
    response = {"id": "resp_fuzz", "object": "response", "created_at": 1700000000, "status": "in_progress",
                "model": model, "output": [], "usage": None}
    events = [_event({"type": "response.created", "sequence_number": 0, "response": response}, sep,
                     name=b"response.created")]
    for i, t in enumerate(texts):
        events.append(_event({"type": "response.output_text.delta", "item_id": "msg_fuzz", "output_index": 0,
                              "content_index": 0, "delta": t, "sequence_number": i + 1}, sep,
                             name=b"response.output_text.delta"))
    done = {**response, "status": "completed", "usage": usage,
            "output": [{"type": "message", "id": "msg_fuzz", "status": "completed", "role": "assistant",
                        "content": [{"type": "output_text", "text": "".join(texts), "annotations": []}]}]}
    events.append(_event({"type": "response.completed", "sequence_number": len(texts) + 1, "response": done}, sep,
                         name=b"response.completed"))
    return Stream(events, Usage(s.prompt, s.completion, cached_tokens=s.cached, reasoning_tokens=s.reasoning,
                                model=model))


def gemini_stream(s: Sent, texts: list[str], model: str = GEMINI_MODEL, sep: bytes = b"\r\n\r\n") -> Stream:
    """Gemini's streamGenerateContent?alt=sse: every chunk repeats a growing usageMetadata, the last is the total."""
    texts = texts or [""]
    events = []
    for i, t in enumerate(texts):
        out = s.completion * (i + 1) // len(texts)
        meta = {"promptTokenCount": s.prompt, "candidatesTokenCount": out,
                "totalTokenCount": s.prompt + out + s.reasoning,
                "promptTokensDetails": [{"modality": "TEXT", "tokenCount": s.prompt}]}
        if s.reasoning:
            meta["thoughtsTokenCount"] = s.reasoning
        if s.cached:
            meta["cachedContentTokenCount"] = s.cached
        candidate = {"content": {"parts": [{"text": t}], "role": "model"}, "index": 0}
        if i == len(texts) - 1:
            candidate["finishReason"] = "STOP"
        events.append(_event({"candidates": [candidate], "usageMetadata": meta, "modelVersion": model,
                              "responseId": "fuzz-gemini"}, sep))
    return Stream(events, Usage(s.prompt, s.completion + s.reasoning, cached_tokens=s.cached,
                                reasoning_tokens=s.reasoning, model=model))


def price_of(provider: str, model: str, usage: Usage) -> float:
    """What a call reporting `usage` should cost, by aipipe.pricing (OpenRouter: its own cost when it gave one,
    else the fake's model list, read as the gateway reads OpenRouter's)."""
    if provider == "openrouter":
        if usage.cost is not None:
            return usage.cost
        listed = {m["id"]: m["pricing"] for m in OPENROUTER_MODELS}
        return cost_of(price_from_pricing(listed[model]), usage)
    price = PRICES.lookup(provider, model)
    assert price is not None, f"no shipped price for {provider} {model}"
    return cost_of(price, usage)


class ScriptedProvider:
    """A provider on loopback that reads each request whole and answers it with `script(request_head)`: a list of
    byte strings written one at a time (with a drain and a short pause between), then the connection is closed
    unless `hang` is set. For faults below HTTP: cut bodies, bad header bytes, connections dropped mid-stream."""

    def __init__(self, script, hang: bool = False, pause: float = 0.002):
        self.script, self.hang, self.pause = script, hang, pause
        self.requests: list[bytes] = []
        self.server: asyncio.AbstractServer | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), 0)
            body = await reader.readexactly(length)
            self.requests.append(head + body)
            for piece in self.script(head + body):
                writer.write(piece)
                await writer.drain()
                await asyncio.sleep(self.pause)
            if self.hang:
                await asyncio.sleep(3600)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def close(self) -> None:
        for w in self._writers:
            w.close()
        if self.server is not None:
            self.server.close()


def http_head(status: str = "200 OK", ctype: str = "text/event-stream", extra: bytes = b"",
              length: int | None = None) -> bytes:
    """A provider's status line and headers (chunked unless a Content-Length is given). It says Connection: close,
    as ScriptedProvider closes every connection after one answer."""
    framing = b"Content-Length: %d\r\n" % length if length is not None else b"Transfer-Encoding: chunked\r\n"
    return (b"HTTP/1.1 " + status.encode() + b"\r\nContent-Type: " + ctype.encode() + b"\r\n" + framing
            + b"Connection: close\r\n" + extra + b"\r\n")


def chunked(data: bytes) -> bytes:
    """One HTTP/1.1 chunk."""
    return b"%x\r\n" % len(data) + data + b"\r\n"


CHUNKED_END = b"0\r\n\r\n"


# -- a fake provider process for soaks: random usage per call, every answer recorded --------------------------

def _draw(rng, provider: str) -> Sent:
    prompt, completion = rng.randint(1, 5000), rng.randint(1, 2000)
    s = Sent(prompt, completion, cached=rng.choice([0, 0, rng.randint(0, prompt)]),
             reasoning=rng.choice([0, rng.randint(0, completion)]))
    if provider == "openrouter" and rng.random() < 0.7:
        s.cost = round(rng.uniform(0, 0.02), 9)
    return s


def reported(provider: str, model: str, s: Sent | None) -> dict:
    """The record of one answer: what it reported, and the price and ledger tokens the gateway should derive."""
    if s is None:
        return {"provider": provider, "model": model, "usage": None}
    if provider == "gemini":
        usage = Usage(s.prompt, s.completion + s.reasoning, cached_tokens=s.cached, reasoning_tokens=s.reasoning)
    else:
        usage = expected_openai(s, model)
    return {"provider": provider, "model": model, "usage": [s.prompt, s.completion, s.cached, s.reasoning, s.cost],
            "input": usage.input_tokens, "output": usage.output_tokens, "price": price_of(provider, model, usage)}


def soak_app(record_path: str, seed: int):
    """OpenAI (chat, responses), OpenRouter (chat, models) and Gemini (generate, alt=sse streams) with random usage;
    a JSON line per answer started and finished goes to record_path."""
    import itertools
    import random
    import time

    import tornado.web

    rng = random.Random(seed)
    ids = itertools.count()
    record = open(record_path, "a", buffering=1)
    words = ["Hello", " wörld", " ✓", " 你好", " and", " so", " on", "."]

    class Soak(tornado.web.RequestHandler):
        def initialize(self, provider: str) -> None:
            self.provider = provider

        def note(self, **fields) -> None:
            record.write(orjson.dumps({**fields, "t": time.time()}).decode() + "\n")

        async def answer(self, model: str, stream: bool, build, json_body) -> None:
            n = next(ids)
            self.note(id=n, event="start")
            s = _draw(rng, self.provider)
            texts = [rng.choice(words) for _ in range(rng.randint(1, 12))]
            if not stream:
                self.set_header("Content-Type", "application/json")
                self.finish(orjson.dumps(json_body(s, texts)))
                self.note(id=n, event="end", **reported(self.provider, model, s))
                return
            made = build(s, texts)
            self.set_header("Content-Type", "text/event-stream")
            for event in made.events:
                self.write(event)
                await self.flush()
                await asyncio.sleep(rng.choice([0, 0, 0.001, 0.005]))
            self.finish()
            self.note(id=n, event="end", **reported(self.provider, model, s if made.usage is not None else None))

    class Chat(Soak):
        async def post(self) -> None:
            body = orjson.loads(self.request.body)
            model, stream = body["model"], bool(body.get("stream"))
            asked = bool((body.get("stream_options") or {}).get("include_usage"))

            def build(s, texts):
                if self.provider == "openrouter":
                    return openrouter_chat(s, texts, model=model)
                made = openai_chat(s, texts, model=model + "-2024-07-18")
                if not asked:  # no usage chunk unless asked for, as OpenAI does
                    made = Stream([e for i, e in enumerate(made.events) if i != made.usage_only], None)
                return made

            def whole(s, texts):
                return {"id": "chatcmpl-soak", "object": "chat.completion", "created": 1700000000, "model": model,
                        "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(texts)},
                                     "finish_reason": "stop"}], "usage": openai_usage(s)}
            await self.answer(model, stream, build, whole)

    class Responses(Soak):
        async def post(self) -> None:
            body = orjson.loads(self.request.body)
            model = body["model"]

            def whole(s, texts):
                done = responses_stream(s, texts, model=model).events[-1]
                return orjson.loads(done.split(b"data: ", 1)[1])["response"]
            await self.answer(model, bool(body.get("stream")), lambda s, t: responses_stream(s, t, model=model), whole)

    class Models(Soak):
        def get(self) -> None:
            self.set_header("Content-Type", "application/json")
            self.finish(orjson.dumps({"data": OPENROUTER_MODELS}))

    class Gemini(Soak):
        async def post(self, model: str, action: str) -> None:
            def whole(s, texts):
                last = gemini_stream(s, ["".join(texts)], model=model).events[-1]
                return orjson.loads(last.split(b"data: ", 1)[1])
            await self.answer(model, action == "streamGenerateContent",
                              lambda s, t: gemini_stream(s, t, model=model), whole)

    return tornado.web.Application([
        (r"/api/v1/chat/completions", Chat, {"provider": "openrouter"}),
        (r"/api/v1/models", Models, {"provider": "openrouter"}),
        (r"/v1/chat/completions", Chat, {"provider": "openai"}),
        (r"/v1/responses", Responses, {"provider": "openai"}),
        (r"/v1beta/models/([^/:]+):(\w+)", Gemini, {"provider": "gemini"}),
    ])


def read_records(path: str) -> tuple[list[dict], list[dict]]:
    """(answers started, answers finished) from a soak fake's record file."""
    with open(path) as f:
        rows = [orjson.loads(line) for line in f if line.strip()]
    return [r for r in rows if r["event"] == "start"], [r for r in rows if r["event"] == "end"]


async def _serve_soak(port: int, record_path: str, seed: int) -> None:
    import signal

    import tornado.httpserver
    server = tornado.httpserver.HTTPServer(soak_app(record_path, seed))
    server.listen(port, "127.0.0.1")
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    print("ready", flush=True)
    await stop.wait()


if __name__ == "__main__":  # python -m tests.soak_support PORT RECORD_FILE SEED: the soak's fake provider process
    import sys
    asyncio.run(_serve_soak(int(sys.argv[1]), sys.argv[2], int(sys.argv[3])))
