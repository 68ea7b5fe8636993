"""A fast fake OpenAI for the benchmark: raw asyncio (uvloop when installed), HTTP/1.1 keep-alive.

`python -m tests.bench_upstream --port P`. POST .../chat/completions answers JSON with usage, or,
with "stream": true, server-sent events (chunked), with "usage": null on every chunk and a final
usage-only chunk when the request asked for stream_options.include_usage, as OpenAI does.
POST .../embeddings answers base64 float32 vectors (Settings.dims wide) with usage.
POST /_bench/config?events=N&interval=S&dims=D sets how many content events a stream has and the seconds
between them (0 = all at once), so every arm of a scenario sees the same upstream.
The tests' fake (tests/fake_upstream.py) is for correctness; this one only has to be cheap.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import functools
import json
import random
import socket
import struct
from urllib.parse import parse_qs

PROMPT_TOKENS, COMPLETION_TOKENS = 12, 7
ANSWER = (b'{"id":"chatcmpl-bench","object":"chat.completion","created":1700000000,"model":"gpt-4o-mini",'
          b'"choices":[{"index":0,"message":{"role":"assistant","content":"Hello from the bench fake."},'
          b'"finish_reason":"stop"}],"usage":{"prompt_tokens":12,"completion_tokens":7,"total_tokens":19}}')
JSON_HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(ANSWER))
SSE_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n"
CHUNK = (b'{"id":"chatcmpl-bench","object":"chat.completion.chunk","created":1700000000,"model":"gpt-4o-mini",'
         b'"choices":[{"index":0,"delta":{"content":"tok "},"finish_reason":null}]%s}')
EMPTY = b"HTTP/1.1 %d %s\r\nContent-Length: 0\r\n\r\n"
MAX_HEAD = 64 * 1024


def frame(event: bytes) -> bytes:
    """One SSE event as one HTTP chunk."""
    data = b"data: " + event + b"\n\n"
    return b"%x\r\n%s\r\n" % (len(data), data)


def usage_event(completion_tokens: int) -> bytes:
    """The include_usage chunk: empty choices and the usage."""
    return frame(b'{"id":"chatcmpl-bench","object":"chat.completion.chunk","created":1700000000,"model":"gpt-4o-mini",'
                 b'"choices":[],"usage":{"prompt_tokens":%d,"completion_tokens":%d,"total_tokens":%d}}'
                 % (PROMPT_TOKENS, completion_tokens, PROMPT_TOKENS + completion_tokens))


class Settings:
    events = 50
    interval = 0.0
    dims = 1536


@functools.lru_cache(maxsize=4)
def vector_pool(dims: int) -> list[bytes]:
    rng = random.Random(dims)
    return [base64.b64encode(struct.pack(f"<{dims}f", *(rng.uniform(-1, 1) for _ in range(dims)))) for _ in range(16)]


def embeddings_answer(body: bytes) -> bytes:
    """OpenAI's /v1/embeddings answer in base64 float32, one row per input, from a small pool of vectors."""
    inputs = json.loads(body).get("input") or [""]
    n = len(inputs) if isinstance(inputs, list) else 1
    pool = vector_pool(Settings.dims)
    rows = b",".join(b'{"object":"embedding","index":%d,"embedding":"%s"}' % (i, pool[i % 16]) for i in range(n))
    answer = (b'{"object":"list","data":[%s],"model":"text-embedding-3-small","usage":{"prompt_tokens":%d,'
              b'"total_tokens":%d}}' % (rows, 4 * n, 4 * n))
    return b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(answer) + answer


class FakeOpenAI(asyncio.Protocol):
    """One connection: parse requests one after the other, answer each."""

    def connection_made(self, transport) -> None:
        self.transport, self.buf, self.busy, self.timer = transport, b"", False, None
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while not self.busy and self.transport is not None:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buf) > MAX_HEAD:
                    self.transport.close()
                return
            head = self.buf[:end].decode("latin-1")
            length = 0
            for line in head.split("\r\n")[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value)
            if len(self.buf) < end + 4 + length:
                return
            body = self.buf[end + 4:end + 4 + length]
            self.buf = self.buf[end + 4 + length:]
            self.answer(head.split(" ", 2)[1], body)

    def answer(self, target: str, body: bytes) -> None:
        path, _, query = target.partition("?")
        if path == "/_bench/config":
            q = parse_qs(query)
            Settings.events = int(q.get("events", [Settings.events])[0])
            Settings.interval = float(q.get("interval", [Settings.interval])[0])
            Settings.dims = int(q.get("dims", [Settings.dims])[0])
            self.transport.write(EMPTY % (204, b"No Content"))
        elif path.endswith("/embeddings"):
            self.transport.write(embeddings_answer(body))
        elif not path.endswith("/chat/completions"):
            self.transport.write(EMPTY % (404, b"Not Found"))
        elif b'"stream":true' in body.replace(b" ", b""):
            self.stream(b'"include_usage":true' in body.replace(b" ", b""))
        else:
            self.transport.write(JSON_HEAD + ANSWER)

    def stream(self, include_usage: bool) -> None:
        event = frame(CHUNK % (b',"usage":null' if include_usage else b""))
        tail = (usage_event(Settings.events) if include_usage else b"") + frame(b"[DONE]") + b"0\r\n\r\n"
        self.transport.write(SSE_HEAD)
        if Settings.interval <= 0:
            self.transport.write(event * Settings.events + tail)
            return
        self.busy = True
        self._tick(Settings.events, Settings.interval, event, tail)

    def _tick(self, left: int, interval: float, event: bytes, tail: bytes) -> None:
        self.timer = None
        if self.transport is None:
            return
        if left == 0:
            self.transport.write(tail)
            self.busy = False
            self.data_received(b"")
            return
        self.transport.write(event)
        self.timer = asyncio.get_running_loop().call_later(interval, self._tick, left - 1, interval, event, tail)


async def serve(host: str, port: int) -> None:
    """Serve until killed."""
    server = await asyncio.get_running_loop().create_server(FakeOpenAI, host, port, backlog=4096, reuse_address=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    asyncio.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
