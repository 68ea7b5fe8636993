"""The HTTP client for provider calls: Tornado's simple client, with connections kept open and reused.

Tornado's simple client opens a new connection for every request (a TLS handshake per call to a
provider). This keeps a small pool of idle connections per host instead. It leans on Tornado
internals (`_HTTPConnection`, `HTTP1Connection.detach()` and its chunked-body reader), so Tornado is
pinned below 7 in setup.py.

Provider calls (`UpstreamRequest`) skip most of Tornado's client: `exchange` writes the request in one
go on a pooled IOStream and reads the answer itself, which costs fewer event-loop turns and far less
Python per call than the queue, request proxy, HTTP1Connection and HTTPResponse it would otherwise go
through. Other requests (price lists, token checks) still use Tornado's client, on the same pool.

Chunked answers (every event stream) are decoded a network read at a time, both ways: Tornado's own
reader awaits three reads per chunk and, since 6.6, holds back chunks already received until it would
have to wait for the network, so an answer that arrives in one read reached the handler only once it
had all been taken apart. Here each read's payload goes to the handler at once, in one piece.
"""
from __future__ import annotations

import asyncio
import functools
import logging
import re
import select
import time
import urllib.parse
from collections import defaultdict

import tornado
from tornado import httputil
from tornado.http1connection import (HTTP1Connection, HTTP1ConnectionParameters, _ExceptionLoggingContext,
                                     is_transfer_encoding_chunked)
from tornado.httpclient import HTTPClientError, HTTPRequest
from tornado.httputil import HTTPInputError
from tornado.iostream import IOStream, StreamClosedError, UnsatisfiableReadError
from tornado.simple_httpclient import HTTPTimeoutError, SimpleAsyncHTTPClient, _client_ssl_defaults, _HTTPConnection
from tornado.tcpclient import TCPClient
from tornado.util import GzipDecompressor

log = logging.getLogger("aipipe.upstream")
IDLE_SECONDS = 20.0  # providers close idle connections after a minute or more; stay well inside that
MAX_IDLE_PER_HOST = 64
MAX_SIZE_LINE = 64  # bytes, CRLF included, as Tornado allows
CHUNK_SIZE = 65536  # bytes read at most at once, as Tornado's default
YIELD_EVERY = 256 * 1024  # bytes read back to back before letting other callbacks run
EXPECTED_ERRORS = (OSError, StreamClosedError, HTTPClientError, HTTPInputError, UnsatisfiableReadError)
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
        if not (self._left or self._crlf or self._last):
            pos = self._whole_chunks(buf, out)
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

    def _whole_chunks(self, buf: bytes, out: list[bytes]) -> int:
        """Take the complete non-empty chunks at the start of buf (the usual read holds nothing else) into
        out; where the rest starts. The general loop in feed does the same, a step at a time."""
        size_line, append, end, pos, total = _SIZE_LINE.match, out.append, len(buf), 0, self.total
        while True:
            head = size_line(buf, pos)
            if head is None:
                break
            start = head.end()
            stop = start + int(head.group(1), 16)
            if stop == start or stop + 2 > end or buf[stop:stop + 2] != b"\r\n":
                break  # the last chunk, a cut one, or a bad one: feed's loop knows what to do
            total += stop - start
            if total > self.max_body_size:
                raise HTTPInputError("chunked body too large")
            append(buf[start:stop])
            pos = stop + 2
        self.total = total
        return pos


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
    for the caller to parse once more. PooledHTTPClient sends it with `exchange` (direct=True) or with
    Tornado's client; either way it fetches to an UpstreamAnswer-like response with `code` and `error`.
    """

    def __init__(self, url: str, on_response_start=None, direct: bool = True, **kwargs):
        super().__init__(url, **kwargs)
        self.on_response_start, self.direct = on_response_start, direct


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
    """SimpleAsyncHTTPClient with connection reuse (requests must send `Connection: keep-alive`).

    An UpstreamRequest is sent by `exchange` instead, straight over a pooled IOStream.
    """

    def initialize(self, *args, **kwargs) -> None:
        super().initialize(*args, **kwargs)
        self.tcp_client.close()
        self.tcp_client = PooledTCPClient(resolver=self.resolver)

    def fetch(self, request, raise_error: bool = True, **kwargs):
        """For an UpstreamRequest to an http(s) URL without credentials in it: `exchange`, as a coroutine (so
        awaiting it costs no extra turn of the event loop) that never raises for HTTP errors."""
        if isinstance(request, UpstreamRequest) and request.direct and _target(request.url) is not None:
            return exchange(self, request)
        return super().fetch(request, raise_error=raise_error, **kwargs)

    def _connection_class(self) -> type:
        return _KeepAliveConnection


class UpstreamAnswer:
    """What `exchange` returns: the status (599 when no complete answer came) and the error, if any."""

    __slots__ = ("code", "reason", "headers", "error")

    def __init__(self) -> None:
        self.code, self.reason, self.headers, self.error = 599, "", None, None


@functools.lru_cache(maxsize=512)
def _target(url: str) -> tuple[str, int, bool, str, str] | None:
    """(host, port, https, Host header, request target) of an http(s) URL; None for others (and user:pass@)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or "@" in parts.netloc or not parts.netloc:
        return None
    host, port = httputil.split_host_and_port(parts.netloc)
    if port is None:
        port = 443 if parts.scheme == "https" else 80
    if re.match(r"^\[.*\]$", host):
        host = host[1:-1]  # IPv6 literal
    target = (parts.path or "/") + ("?" + parts.query if parts.query else "")
    return host, port, parts.scheme == "https", parts.netloc, target


def _request_head(request: UpstreamRequest, host_header: str, target: str) -> bytes:
    """The request line and headers, with what Tornado's client would add."""
    headers = request.headers
    names = {name.lower() for name in headers}
    lines = [f"{request.method} {target} HTTP/1.1"]
    if "host" not in names:
        lines.append(f"Host: {host_header}")
    lines.extend(f"{name}: {value}" for name, value in headers.items())
    if "connection" not in names:
        lines.append("Connection: close")
    if "user-agent" not in names:
        lines.append(f"User-Agent: Tornado/{tornado.version}")
    if request.body is not None:
        lines.append(f"Content-Length: {len(request.body)}")
    if request.method == "POST" and "content-type" not in names:
        lines.append("Content-Type: application/x-www-form-urlencoded")
    if request.decompress_response:
        lines.append("Accept-Encoding: gzip")
    head = "\r\n".join(lines)
    if "\n" in head.replace("\r\n", "") or "\r" in head.replace("\r\n", ""):
        raise ValueError("Newline in request header")
    return (head + "\r\n\r\n").encode("latin1")


async def exchange(client: PooledHTTPClient, request: UpstreamRequest) -> UpstreamAnswer:
    """One request on a pooled connection, the answer's head to on_response_start and its body, read by read,
    to streaming_callback (awaited, so a slow consumer slows the reading). Errors come back in the answer
    (code 599) as Tornado's client reports them: timeouts as HTTPClientError 599 "Timeout ...", a
    connection that closed as StreamClosedError, refusals as OSError, malformed answers as HTTPInputError.
    """
    answer, loop = UpstreamAnswer(), asyncio.get_running_loop()
    started, stream, timer, timed_out = loop.time(), None, None, ""
    reusable = False
    try:
        host, port, https, host_header, target = _target(request.url)
        head = _request_head(request, host_header, target)
        limits = [t for t in (request.connect_timeout, request.request_timeout) if t]
        try:
            stream = await client.tcp_client.connect(
                host, port, ssl_options=_tls_defaults() if https else None,
                max_buffer_size=client.max_buffer_size, timeout=started + min(limits) - loop.time() if limits else None)
        except TimeoutError as e:
            raise HTTPTimeoutError(str(e) or "Timeout while connecting") from None
        if not getattr(stream, "nodelay", False):
            stream.set_nodelay(True)
            stream.nodelay = True
        if request.request_timeout:
            def expire() -> None:
                nonlocal timed_out
                timed_out = "Timeout during request"
                stream.close()
            timer = loop.call_at(started + request.request_timeout, expire)
        body = request.body
        if body and len(body) > 65536:
            stream.write(head)
            stream.write(body)
        else:
            stream.write(head + body if body else head)
        reusable = await _read_answer(client, request, stream, answer)
    except Exception as e:
        answer.code, answer.error = 599, HTTPTimeoutError(timed_out) if timed_out else e
        if not timed_out and not isinstance(e, EXPECTED_ERRORS):
            log.error("upstream request to %s failed", request.url, exc_info=True)
    finally:
        if timer is not None:
            timer.cancel()
        if stream is not None:
            if reusable and not timed_out and not stream.closed() and getattr(stream, "pool_key", None):
                client.tcp_client.give_back(stream)
            else:
                stream.close()
    return answer


def _tls_defaults():
    return _client_ssl_defaults() if callable(_client_ssl_defaults) else _client_ssl_defaults  # 6.6 | 6.5


async def _read_answer(client: PooledHTTPClient, request: UpstreamRequest, stream: IOStream,
                       answer: UpstreamAnswer) -> bool:
    """Read one answer into answer and request's callbacks; whether the connection may be reused."""
    max_body_size = client.max_body_size or client.max_buffer_size
    while True:
        data = await stream.read_until_regex(b"\r?\n\r?\n", max_bytes=client.max_header_size or 65536)
        text = data.decode("latin1").lstrip("\r\n")
        eol = text.find("\n")
        start_line = httputil.parse_response_start_line(text[:eol].rstrip("\r"))
        headers = httputil.HTTPHeaders.parse(text[eol:])
        if not 100 <= start_line.code < 200:
            break
        if "Content-Length" in headers or "Transfer-Encoding" in headers:
            raise HTTPInputError("Response code %d cannot have body" % start_line.code)
        if request.on_response_start is not None:
            request.on_response_start(start_line, headers)
    code = answer.code = start_line.code
    answer.reason, answer.headers = start_line.reason, headers
    gunzip = None
    if request.decompress_response and headers.get("Content-Encoding", "").lower() == "gzip":
        gunzip = GzipDecompressor()
        headers.add("X-Consumed-Content-Encoding", headers["Content-Encoding"])
        del headers["Content-Encoding"]
    if request.on_response_start is not None:
        request.on_response_start(start_line, headers)
    deliver = request.streaming_callback

    async def received(data: bytes) -> None:
        if gunzip is None:
            pending = deliver(data)
            if pending is not None:
                await pending
            return
        while data:
            plain = gunzip.decompress(data, CHUNK_SIZE)
            if plain:
                pending = deliver(plain)
                if pending is not None:
                    await pending
            data = gunzip.unconsumed_tail
            if data and not plain:
                raise HTTPInputError("encountered unconsumed gzip data without making progress")

    length = headers.get("Content-Length")
    if length is not None and "," in length:  # duplicated by a proxy: fine if all agree
        pieces = re.split(r",[ \t]*", length)
        if any(piece != pieces[0] for piece in pieces):
            raise HTTPInputError(f"Multiple unequal Content-Lengths: {length!r}")
        length = pieces[0]
    if length is not None:
        if not length.isdigit() or not length.isascii():
            raise HTTPInputError(f"Only integer Content-Length is allowed: {length}")
        length = int(length)
        if length > max_body_size:
            raise HTTPInputError("Content-Length too long")
    chunked = is_transfer_encoding_chunked(headers)
    if chunked and length is not None:
        raise HTTPInputError("Message with both Transfer-Encoding and Content-Length")
    if code in (204, 304) or request.method == "HEAD":
        if code == 204 and (chunked or length not in (None, 0)):
            raise HTTPInputError(f"Response with code {code} should not have body")
        chunked, length = False, 0
    since_yield = 0
    if chunked:
        decoder = ChunkedDecoder(max_body_size)
        while not decoder.done:
            data = await stream.read_bytes(CHUNK_SIZE, partial=True)
            payload = decoder.feed(data)
            if payload:
                await received(payload)
            since_yield += len(data)
            if since_yield >= YIELD_EVERY:
                since_yield = 0
                await asyncio.sleep(0)
        reusable = not decoder.leftover
    elif length is not None:
        while length:
            data = await stream.read_bytes(min(CHUNK_SIZE, length), partial=True)
            length -= len(data)
            await received(data)
            since_yield += len(data)
            if since_yield >= YIELD_EVERY:
                since_yield = 0
                await asyncio.sleep(0)
        reusable = True
    else:  # the answer ends when the connection does
        total = 0
        while True:
            try:
                data = await stream.read_bytes(CHUNK_SIZE, partial=True)
            except StreamClosedError:
                break
            total += len(data)
            if total > max_body_size:
                raise HTTPInputError("Body too large")
            await received(data)
        reusable = False
    if gunzip is not None:
        tail = gunzip.flush()
        if tail:
            pending = deliver(tail)
            if pending is not None:
                await pending
    connection = headers.get("Connection", "").lower()
    keep = connection != "close" if start_line.version == "HTTP/1.1" else connection == "keep-alive"
    return reusable and keep and not getattr(stream, "_read_buffer_size", 1)
