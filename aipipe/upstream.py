"""The HTTP client for provider calls: Tornado's simple client, with connections kept open and reused.

Tornado's simple client opens a new connection for every request (a TLS handshake per call to a
provider). This keeps a small pool of idle connections per host instead. It leans on Tornado
internals (`_HTTPConnection`, `HTTP1Connection.detach()` and its chunked-body reader), so Tornado is
pinned below 7 in setup.py.

Chunked answers (every event stream) are decoded here a network read at a time: Tornado's own reader
awaits three reads per chunk and, since 6.6, holds back chunks already received until it would have
to wait for the network, so an answer that arrives in one read reached the handler only once it had
all been taken apart. Here each read's payload goes to the handler at once, in one piece.
"""
from __future__ import annotations

import asyncio
import logging
import re
import select
import time
from collections import defaultdict

from tornado.httpclient import HTTPRequest
from tornado.http1connection import HTTP1Connection, HTTP1ConnectionParameters, _ExceptionLoggingContext
from tornado.httputil import HTTPInputError
from tornado.iostream import IOStream
from tornado.simple_httpclient import SimpleAsyncHTTPClient, _HTTPConnection
from tornado.tcpclient import TCPClient

log = logging.getLogger("aipipe.upstream")
IDLE_SECONDS = 20.0  # providers close idle connections after a minute or more; stay well inside that
MAX_IDLE_PER_HOST = 64
MAX_SIZE_LINE = 64  # bytes, CRLF included, as Tornado allows
YIELD_EVERY = 256 * 1024  # bytes read back to back before letting other callbacks run
_SIZE_LINE = re.compile(rb"([0-9A-Fa-f]{1,%d})\r\n" % (MAX_SIZE_LINE - 2))


def still_usable(stream: IOStream) -> bool:
    """An idle connection is reusable if it is open and has nothing to read (no EOF, no stray bytes)."""
    if stream.closed() or stream.reading():
        return False
    try:
        readable, _, _ = select.select([stream.fileno()], [], [], 0)
    except (OSError, ValueError):
        return False
    return not readable


class ChunkedDecoder:
    """Chunked transfer coding undone over pieces cut anywhere; no chunk extensions or trailers (as Tornado)."""

    def __init__(self, max_body_size: int):
        self.max_body_size = max_body_size
        self.total = 0
        self.done = False
        self.leftover = b""  # bytes that came after the last chunk (the connection must not be reused)
        self._pending = b""  # framing not yet complete: part of a size line or of a CRLF
        self._left = 0  # payload bytes of the current chunk still to come
        self._crlf = False  # a chunk's payload ended; its CRLF comes next
        self._last = False  # the zero-size chunk was read; the final CRLF comes next

    def feed(self, data: bytes) -> bytes:
        """The payload carried by data (b"" if none)."""
        if self.done:
            self.leftover += data
            return b""
        buf = self._pending + data if self._pending else data
        pos, end, out = 0, len(buf), []
        while pos < end:
            if self._left:  # the rest of a chunk cut by the previous read
                take = min(self._left, end - pos)
                out.append(buf if pos == 0 and take == end else buf[pos:pos + take])
                pos += take
                self._left -= take
                self._crlf = not self._left
            elif self._crlf or self._last:
                if end - pos < 2:
                    break
                if buf[pos:pos + 2] != b"\r\n":
                    raise HTTPInputError("improperly terminated chunk")
                pos += 2
                self._crlf = False
                if self._last:
                    self.done, self.leftover = True, buf[pos:]
                    pos = end
            else:
                head = _SIZE_LINE.match(buf, pos)
                if head is None:
                    if buf.find(b"\r\n", pos, pos + MAX_SIZE_LINE) >= 0:
                        raise HTTPInputError("invalid chunk size")
                    if end - pos >= MAX_SIZE_LINE:
                        raise HTTPInputError("chunk size line too long")
                    break
                size, pos = int(head.group(1), 16), head.end()
                self.total += size
                if self.total > self.max_body_size:
                    raise HTTPInputError("chunked body too large")
                if not size:
                    self._last = True
                elif pos + size + 2 <= end:  # the whole chunk is here: the usual case, in one step
                    stop = pos + size
                    if buf[stop:stop + 2] != b"\r\n":
                        raise HTTPInputError("improperly terminated chunk")
                    out.append(buf[pos:stop])
                    pos = stop + 2
                else:
                    self._left = size
        self._pending = buf[pos:] if pos < end else b""
        return out[0] if len(out) == 1 else b"".join(out)


class _UpstreamHTTP1Connection(HTTP1Connection):
    """Tornado's client-side HTTP/1 connection with a chunked-body reader that hands on each read whole."""

    reusable = True

    async def _read_chunked_body(self, delegate) -> None:
        decoder, since_yield = ChunkedDecoder(self._max_body_size), 0
        while not decoder.done:
            data = await self.stream.read_bytes(self.params.chunk_size, partial=True)
            body = decoder.feed(data)
            if body:
                with _ExceptionLoggingContext(log):
                    pending = delegate.data_received(body)
                    if pending is not None:
                        await pending
            since_yield += len(data)
            if since_yield >= YIELD_EVERY:
                since_yield = 0
                await asyncio.sleep(0)
        if decoder.leftover:
            self.reusable = False


class UpstreamRequest(HTTPRequest):
    """An HTTPRequest that hands the answer's status line and headers, as parsed, to on_response_start.

    Tornado's header_callback gets them as text lines, re-formatted from what it had already parsed,
    for the caller to parse once more.
    """

    def __init__(self, url: str, on_response_start=None, **kwargs):
        super().__init__(url, **kwargs)
        self.on_response_start = on_response_start


class PooledTCPClient(TCPClient):
    """A TCPClient that hands out idle connections before opening new ones."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.idle: dict[tuple, list[tuple[IOStream, float]]] = defaultdict(list)

    async def connect(self, host, port, af=0, ssl_options=None, max_buffer_size=None, source_ip=None,
                      source_port=None, timeout=None) -> IOStream:
        """An idle connection to (host, port) if a usable one is pooled, else a new one."""
        key = (host, port, ssl_options is not None)
        pool, now = self.idle.get(key), time.monotonic()
        while pool:
            stream, since = pool.pop()
            if now - since < IDLE_SECONDS and still_usable(stream):
                return stream
            stream.close()
        kwargs = {"af": af, "ssl_options": ssl_options, "max_buffer_size": max_buffer_size,
                  "source_ip": source_ip, "source_port": source_port, "timeout": timeout}
        stream = await super().connect(host, port, **kwargs)
        stream.pool_key = key
        return stream

    def give_back(self, stream: IOStream) -> None:
        """Keep a connection whose last response was read to the end."""
        pool = self.idle[stream.pool_key]
        if len(pool) < MAX_IDLE_PER_HOST:
            pool.append((stream, time.monotonic()))
        else:
            stream.close()

    def close(self) -> None:
        for pool in self.idle.values():
            for stream, _ in pool:
                stream.close()
        self.idle.clear()
        super().close()


class _KeepAliveConnection(_HTTPConnection):
    """One request on a pooled connection: asks for keep-alive and returns the connection when done."""

    def _create_connection(self, stream: IOStream) -> HTTP1Connection:
        if not getattr(stream, "nodelay", False):  # once per connection, not once per request
            stream.set_nodelay(True)
            stream.nodelay = True
        return _UpstreamHTTP1Connection(stream, True, HTTP1ConnectionParameters(
            no_keep_alive=False, max_header_size=self.max_header_size, max_body_size=self.max_body_size,
            decompress=bool(self.request.decompress_response)), self._sockaddr)

    async def headers_received(self, first_line, headers) -> None:
        await super().headers_received(first_line, headers)
        on_start = getattr(getattr(self.request, "request", None), "on_response_start", None)
        if on_start is not None and not self._should_follow_redirect():
            on_start(first_line, headers)

    def _on_end_request(self) -> None:
        reusable = (self.connection.reusable and self.headers is not None
                    and self.headers.get("Connection", "").lower() != "close"
                    and getattr(self.stream, "pool_key", None) is not None and not self.stream.closed())
        if not reusable:
            self.stream.close()
            return
        stream = self.connection.detach()  # the HTTP/1 reader lets go of the stream and its callbacks
        self.tcp_client.give_back(stream)


class PooledHTTPClient(SimpleAsyncHTTPClient):
    """SimpleAsyncHTTPClient with connection reuse (requests must send `Connection: keep-alive`)."""

    def initialize(self, *args, **kwargs) -> None:
        super().initialize(*args, **kwargs)
        self.tcp_client.close()
        self.tcp_client = PooledTCPClient(resolver=self.resolver)

    def _connection_class(self) -> type:
        return _KeepAliveConnection
