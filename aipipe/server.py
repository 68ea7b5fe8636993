"""make_app(gateway) -> tornado.web.Application, and run(): the serving process itself."""
from __future__ import annotations

import asyncio
import ctypes
import gc
import logging
import os
import signal
import sys
from collections.abc import Callable

import tornado.netutil
import tornado.process
import tornado.web

from .config import Config
from .gateway import Gateway
from .handlers import routes
from .handlers.lean import LeanApplication
from .handlers.page_base import template_environment
from .ledger import spool_dir
from .listener import GatewayHTTPServer
from .logs import line_writer, write_each_line
from .storage import StoreConfigError, mask_url, open_store, url_scheme

log = logging.getLogger("aipipe")
PR_SET_PDEATHSIG = 1  # linux/prctl.h
access_log = logging.getLogger("aipipe.access")


def access_logger() -> Callable[[tornado.web.RequestHandler], None]:
    """Tornado's log_function: one access-log line per request (query strings are left out: they can carry
    credentials). Made when the app is, to take logs.line_writer's fast path if the logging set-up allows."""
    write = line_writer(access_log)

    def log_request(handler: tornado.web.RequestHandler) -> None:
        status = handler.get_status()
        level = logging.INFO if status < 400 else logging.WARNING if status < 500 else logging.ERROR
        request = handler.request
        write(level, f"{status} {request.method} {request.path} {1000.0 * request.request_time():.1f}ms")
    return log_request


def make_app(gateway: Gateway, **settings) -> tornado.web.Application:
    """The Tornado application for a gateway; extra settings go to Application."""
    return LeanApplication(routes(gateway), log_function=access_logger(), gateway=gateway,
                           jinja=template_environment(), max_body_bytes=gateway.config.get("server.max_body_bytes"),
                           **settings)


def make_server(app: LeanApplication, config: Config) -> GatewayHTTPServer:
    """The HTTP server for app, with the connection, header and body bounds of config."""
    return GatewayHTTPServer(
        app, xheaders=config.get("server.xheaders"), max_connections=config.get("server.max_connections"),
        idle_connection_timeout=config.get("server.idle_seconds"), body_timeout=config.get("server.body_seconds"),
        # the application holds bodies to server.max_body_bytes itself, with a JSON 413 (handlers.intake);
        # Tornado's own check would answer a bare 400 before it could
        max_body_size=1 << 62)


def _install_fast_loop() -> None:
    try:
        import uvloop  # optional: pip install aipipe[fast]
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


async def _serve(config: Config, sockets, spool_path: str, processes: int) -> None:
    try:
        store = await open_store(config.get("storage.url"), config.get("storage.pool_min"), config.get("storage.pool_max"))
    except StoreConfigError as e:
        log.error("%s", e)
        raise SystemExit(1) from None
    sockname = sockets[0].getsockname()
    log.info("AI Pipe listening on http://%s:%d (storage %s)", sockname[0], sockname[1], mask_url(config.get("storage.url")))
    gateway = Gateway(config, store, spool_dir=spool_path, processes=processes)
    try:
        await gateway.start()
    except StoreConfigError as e:
        log.error("%s", e)
        await store.close()
        raise SystemExit(1) from None
    app = make_app(gateway)
    server = make_server(app, config)
    server.add_sockets(sockets)
    # What start-up made (modules, routes, templates, prices) lives as long as the server: leave it out of
    # the collector's full passes, which otherwise walk it all every few thousand requests (README, Performance).
    gc.collect()
    gc.freeze()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    drain = config.get("server.drain_seconds")
    log.info("shutting down: no new connections; %d requests open get up to %.0f s to finish",
             app.open_requests.count(), drain)
    server.stop()
    await app.open_requests.drain(drain)
    try:
        await asyncio.wait_for(server.close_all_connections(), 5)
    except TimeoutError:
        log.warning("some connections were still open 5 s after the drain")
    await gateway.close()
    await store.close()
    log.info("stopped; every charge written or spooled")


def _stop_with_parent(parent: int) -> None:
    """In a forked worker (Linux): get SIGTERM when the parent dies, so stopping the parent stops every worker
    (rather than leaving them serving the port with nobody to restart them)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux
        return
    if os.getppid() != parent:  # the parent died before prctl
        os.kill(os.getpid(), signal.SIGTERM)


def run(config: Config, host: str, port: int, processes: int = 1) -> None:
    """Bind, optionally fork worker processes, and serve until SIGTERM/SIGINT."""
    try:
        sockets = tornado.netutil.bind_sockets(port, host)
    except OSError as e:  # port taken (another server?) or address not on this machine
        log.error("cannot listen on %s:%d: %s", host, port, e.strerror or e)
        raise SystemExit(1) from None
    task_id = None
    if processes > 1 and url_scheme(config.get("storage.url")) == "sqlite":
        log.warning("%d processes on one SQLite file admit every call through the file, which measured slower than one "
                    "process on its own (README, Performance); PostgreSQL is what scales across processes", processes)
    if processes > 1:
        write_each_line()  # the workers share standard error: one whole line per write
        gc.freeze()  # what the parent loaded stays shared with the workers instead of being copied by the collector
        parent = os.getpid()
        task_id = tornado.process.fork_processes(processes)
        _stop_with_parent(parent)
    spool = spool_dir(config.get("storage.url"))  # one folder per store, shared by its processes (aipipe.ledger)
    _install_fast_loop()
    try:
        asyncio.run(_serve(config, sockets, spool, processes))
    except KeyboardInterrupt:
        sys.exit(0)
