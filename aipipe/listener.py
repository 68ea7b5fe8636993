"""The listening side of the server: how many connections clients may hold, and what happens when the
process runs out of file descriptors.

Tornado's accept loop re-raises an accept() failure such as EMFILE (too many open files), and the event loop
then logs a traceback every time the listening socket is readable, which it stays while the backlog is
full: thousands of lines a second. Here the number of open connections is capped below the open-file limit,
a connection over the cap gets a short 503 and is closed, and an accept() failure pauses accepting for a
moment with one log line per interval.
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

    def initialize(self, *args, max_connections: int = 4096, **kwargs) -> None:
        super().initialize(*args, **kwargs)
        self.max_connections = max(1, min(max_connections, raise_open_file_limit() - RESERVED_FDS))
        self.refused = Throttled("refused %d connections over the cap of open connections%s")
        self.failed_accepts = Throttled("accepting connections failed %d times (%s); pausing briefly")

    def add_sockets(self, sockets) -> None:
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
                if len(self._connections) >= self.max_connections:
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
