"""The HTTP client for provider calls: Tornado's simple client, with connections kept open and reused.

Tornado's simple client opens a new connection for every request (a TLS handshake per call to a
provider). This keeps a small pool of idle connections per host instead. It leans on two Tornado
internals, `_HTTPConnection` and `HTTP1Connection.detach()`, so Tornado is pinned below 7 in setup.py.
"""
from __future__ import annotations

import select
import time
from collections import defaultdict

from tornado.http1connection import HTTP1Connection
from tornado.iostream import IOStream
from tornado.simple_httpclient import SimpleAsyncHTTPClient, _HTTPConnection
from tornado.tcpclient import TCPClient

IDLE_SECONDS = 20.0  # providers close idle connections after a minute or more; stay well inside that
MAX_IDLE_PER_HOST = 64


def still_usable(stream: IOStream) -> bool:
    """An idle connection is reusable if it is open and has nothing to read (no EOF, no stray bytes)."""
    if stream.closed() or stream.reading():
        return False
    try:
        readable, _, _ = select.select([stream.fileno()], [], [], 0)
    except (OSError, ValueError):
        return False
    return not readable


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
        connection = super()._create_connection(stream)
        connection.params.no_keep_alive = False
        return connection

    def _on_end_request(self) -> None:
        reusable = (self.headers is not None and self.headers.get("Connection", "").lower() != "close"
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
