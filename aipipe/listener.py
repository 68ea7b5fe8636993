"""The listening side of the server: how many connections clients may hold, and what happens when the
process runs out of file descriptors.

Tornado's accept loop re-raises an accept() failure such as EMFILE (too many open files), and the event loop
then logs a traceback every time the listening socket is readable, which it stays while the backlog is
full: thousands of lines a second. Here the number of open connections is capped below the open-file limit,
and at the cap the connection that has waited longest for a request's headers (a half-sent request, or an
idle keep-alive connection) is closed to make room, so that holding connections half-open cannot lock
clients out; only when every connection is mid-request does a newcomer get a short 503. An accept()
failure pauses accepting for a moment with one log line per interval.
"""
from __future__ import annotations

import errno
import logging
import resource
import socket
import time

import tornado.httpserver
from tornado.ioloop import IOLoop

log = logging.getLogger("aipipe")
RESERVED_FDS = 128  # for the store, provider connections, log files and the like
ACCEPTS_PER_WAKE = 128  # as Tornado's own accept loop: let other work run between bursts
PAUSE_SECONDS = 0.5  # how long accepting stops after the process ran out of descriptors
LOG_EVERY = 10.0  # seconds between log lines about refused connections or failed accepts
OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nAccess-Control-Allow-Origin: *\r\n"
        b"Retry-After: 1\r\nConnection: close\r\nContent-Length: 60\r\n\r\n"
        b'{"message": "Server busy: too many open connections, retry"}')


def raise_open_file_limit() -> int:
    """Raise this process's soft limit on open files to its hard limit; returns the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = 1 << 20 if hard == resource.RLIM_INFINITY else hard
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


class Throttled:
    """Counts an event and logs it at most once per LOG_EVERY seconds, with how many happened since."""

    def __init__(self, message: str) -> None:
        self.message, self.count, self.logged_at = message, 0, float("-inf")

    def note(self, detail: str = "") -> None:
        self.count += 1
        now = time.monotonic()
        if now - self.logged_at >= LOG_EVERY:
            log.warning(self.message, self.count, detail)
            self.count, self.logged_at = 0, now


class GatewayHTTPServer(tornado.httpserver.HTTPServer):
    """An HTTPServer whose accept loop caps open connections and survives running out of descriptors."""

    def initialize(self, *args, max_connections: int = 4096, body_seconds: float | None = None, **kwargs) -> None:
        super().initialize(*args, **kwargs)
        # Tornado's own body_timeout wraps every body read in gen.with_timeout, several hundred bytecodes a
        # request; one sweep a second over the requests whose body is still coming costs a dict entry each
        self.body_seconds = body_seconds
        self._bodies: dict[object, float] = {}  # requests whose body is being read -> when their headers came
        self._sweeping = None
        self.max_connections = max(1, min(max_connections, raise_open_file_limit() - RESERVED_FDS))
        self.refused = Throttled("refused %d connections over the cap of open connections%s")
        self.evicted = Throttled("closed %d connections that waited longest for a request, to make room%s")
        self.slow_bodies = Throttled("closed %d connections whose request body took too long%s")
        self.failed_accepts = Throttled("accepting connections failed %d times (%s); pausing briefly")
        # connections waiting for a request's headers, oldest first, and the request each is waiting on
        self._waiting: dict[object, object] = {}
        self._connection_of: dict[object, object] = {}
        if hasattr(self.request_callback, "headers_in"):  # the application says when a request's headers are in
            self.request_callback.headers_in = self.headers_in  # and its body
            self.request_callback.body_in = self.body_in

    def start_request(self, server_conn, request_conn):
        self._waiting[server_conn] = request_conn
        self._connection_of[request_conn] = server_conn
        return super().start_request(server_conn, request_conn)

    def headers_in(self, request_conn) -> None:
        """A request's headers have arrived: its connection is no longer waiting."""
        server_conn = self._connection_of.pop(request_conn, None)
        if server_conn is not None:
            self._waiting.pop(server_conn, None)
        if self.body_seconds:
            self._bodies[request_conn] = time.monotonic()

    def body_in(self, request_conn) -> None:
        """A request's body has arrived whole (or there was none)."""
        self._bodies.pop(request_conn, None)

    def _sweep_bodies(self) -> None:
        """Close the connections whose request body has taken longer than body_seconds; look again in a second."""
        too_old = time.monotonic() - self.body_seconds
        bodies = self._bodies
        while bodies:
            request_conn, since = next(iter(bodies.items()))
            if since > too_old:
                break
            del bodies[request_conn]
            self.slow_bodies.note(f" ({self.body_seconds:g} s)")
            request_conn.close()
        self._sweeping = IOLoop.current().call_later(1.0, self._sweep_bodies)

    def stop(self) -> None:
        if self._sweeping is not None:
            IOLoop.current().remove_timeout(self._sweeping)
            self._sweeping = None
        super().stop()

    def on_close(self, server_conn) -> None:
        request_conn = self._waiting.pop(server_conn, None)
        if request_conn is not None:
            self._connection_of.pop(request_conn, None)
        super().on_close(server_conn)

    def _make_room(self) -> bool:
        """Close the connection that has waited longest for a request's headers; False if none is waiting."""
        if not self._waiting:
            return False
        server_conn = next(iter(self._waiting))
        self._connection_of.pop(self._waiting.pop(server_conn), None)
        server_conn.stream.close()
        self.evicted.note(f" (cap {self.max_connections})")
        return True

    def add_sockets(self, sockets) -> None:
        if self.body_seconds and self._sweeping is None:
            self._sweeping = IOLoop.current().call_later(1.0, self._sweep_bodies)
        for sock in sockets:
            self._sockets[sock.fileno()] = sock
            self._handlers[sock.fileno()] = self._accept_on(sock)

    def _accept_on(self, sock: socket.socket):
        """Serve sock's connections from the IOLoop; returns the function that stops it."""
        io_loop = IOLoop.current()
        state = {"removed": False, "paused": False}

        def resume() -> None:
            if not state["removed"] and state["paused"]:
                state["paused"] = False
                io_loop.add_handler(sock, on_readable, IOLoop.READ)

        def on_readable(fd, events) -> None:
            for _ in range(ACCEPTS_PER_WAKE):
                if state["removed"]:
                    return
                try:
                    connection, address = sock.accept()
                except BlockingIOError:
                    return
                except ConnectionAbortedError:
                    continue
                except OSError as e:
                    if e.errno not in OUT_OF_RESOURCES:
                        raise
                    self.failed_accepts.note(e.strerror or str(e))
                    state["paused"] = True
                    io_loop.remove_handler(sock)
                    io_loop.call_later(PAUSE_SECONDS, resume)
                    return
                if len(self._connections) >= self.max_connections and not self._make_room():
                    self._refuse(connection)
                    continue
                self._handle_connection(connection, address)

        def remove() -> None:
            if not state["paused"]:
                io_loop.remove_handler(sock)
            state["removed"] = True

        io_loop.add_handler(sock, on_readable, IOLoop.READ)
        return remove

    def _refuse(self, connection: socket.socket) -> None:
        """A short 503 to a connection over the cap, written without waiting, then closed."""
        try:
            connection.setblocking(False)
            connection.send(BUSY)
        except OSError:
            pass
        finally:
            connection.close()
        self.refused.note(f" ({self.max_connections})")
