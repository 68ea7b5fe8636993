"""make_app(gateway) -> tornado.web.Application, and run(): the serving process itself."""
from __future__ import annotations

import asyncio
import atexit
import ctypes
import gc
import logging
import os
import signal
import sys
import tempfile
import time
from collections.abc import Callable

import tornado.netutil
import tornado.process
import tornado.web

from .config import KEY_ENV, Config
from .gateway import Gateway
from .handlers import routes
from .handlers.lean import LeanApplication
from .handlers.page_base import template_environment
from .spool import spool_dir
from .listener import GatewayHTTPServer
from .logs import line_writer, write_each_line
from .metrics import Metrics, use_multiprocess_folder, worker_exited
from .systemd import notify, pid_file_for, remove_pid_file, write_pid_file
from .storage import StoreConfigError, mask_url, open_store, url_scheme

log = logging.getLogger("aipipe")
PR_SET_PDEATHSIG = 1  # linux/prctl.h
access_log = logging.getLogger("aipipe.access")


def access_logger(metrics: Metrics | None = None) -> Callable[[tornado.web.RequestHandler], None]:
    """Tornado's log_function: one access-log line per request with its status, method, path, milliseconds and client,
    and the caller's email, provider, model and cost when the handler knows them. Query strings are left out (they
    can carry credentials). Made when the app is, to take logs.line_writer's fast path if the logging set-up allows."""
    from .logs import one_line, usd

    write = line_writer(access_log)
    with_fields = write.wants_fields  # JSON lines, or records others listen to; text lines need only the message

    def log_request(handler: tornado.web.RequestHandler) -> None:
        status = handler.get_status()
        provider = getattr(handler, "provider_name", None)
        if metrics is not None:  # counted here, with the line: one call per request for both
            route = getattr(handler, "route_class", "other")
            metrics.request_done(provider or "", route, status)
            if route == "health" and status < 400:  # a monitor's polls would drown the log
                return
        level = logging.INFO if status < 400 else logging.WARNING if status < 500 else logging.ERROR
        request = handler.request
        ms = 1000.0 * request.request_time()
        message = f"{status} {request.method} {request.path} {ms:.1f}ms {request.remote_ip}"
        # a ProviderCall's caller is `checked` (None for a native key), other handlers' `identity`
        email = getattr(getattr(handler, "checked", None) or getattr(handler, "identity", None), "email", None)
        model = getattr(getattr(handler, "call", None), "model", None)
        cost = getattr(getattr(handler, "outcome", None), "cost", None)
        if email:
            email = one_line(email)
            message += " " + email
        if provider:
            message += " " + provider
        if model:
            model = one_line(model)  # from the request body: a newline in it must not forge a line
            message += " " + model
        if cost.__class__ is float:
            message += " " + usd(cost)
        else:
            cost = None
        if not with_fields:
            return write(level, message)
        fields = {"status": status, "method": request.method, "path": request.path, "duration_ms": round(ms, 1),
                  "client": request.remote_ip}
        for key, value in (("email", email), ("provider", provider), ("model", model), ("cost", cost)):
            if value:
                fields[key] = value
        write(level, message, fields)
    return log_request


def make_app(gateway: Gateway, **settings) -> tornado.web.Application:
    """The Tornado application for a gateway; extra settings go to Application."""
    return LeanApplication(routes(gateway), log_function=access_logger(gateway.metrics), gateway=gateway,
                           jinja=template_environment(), max_body_bytes=gateway.config.get("server.max_body_bytes"),
                           **settings)


def make_server(app: LeanApplication, config: Config) -> GatewayHTTPServer:
    """The HTTP server for app, with the connection, header and body bounds of config."""
    return GatewayHTTPServer(
        app, xheaders=config.get("server.xheaders"), max_connections=config.get("server.max_connections"),
        idle_connection_timeout=config.get("server.idle_seconds"), body_seconds=config.get("server.body_seconds"),
        # the application holds bodies to server.max_body_bytes itself, with a JSON 413 (handlers.intake);
        # Tornado's own check would answer a bare 400 before it could
        max_body_size=1 << 62)


def _install_fast_loop() -> None:
    try:
        import uvloop  # optional: pip install aipipe[fast]
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


async def _serve(config: Config, sockets, processes: int, load_config: Callable[[], Config] | None) -> None:
    try:
        store = await open_store(config.get("storage.url"), config.get("storage.pool_min"), config.get("storage.pool_max"))
    except StoreConfigError as e:
        log.error("%s", e)
        raise SystemExit(1) from None
    # one spool folder per store, shared by its processes (aipipe.ledger); the URL is known to parse by now
    gateway = Gateway(config, store, spool_dir=spool_dir(config.get("storage.url")), processes=processes)
    try:
        await gateway.start()
    except StoreConfigError as e:
        log.error("%s", e)
        await store.close()
        raise SystemExit(1) from None
    app = make_app(gateway)
    server = make_server(app, config)
    server.add_sockets(sockets)
    sockname = sockets[0].getsockname()
    log.info("AI Pipe listening on http://%s:%d (storage %s)", sockname[0], sockname[1], mask_url(config.get("storage.url")))
    log_providers(config)
    pid_path = pid_file_for(config) if processes == 1 else None  # with workers, the parent's pid is written
    if pid_path:
        write_pid_file(pid_path)
    notify("READY=1")
    # What start-up made (modules, routes, templates, prices) lives as long as the server: leave it out of
    # the collector's full passes, which otherwise walk it all every few thousand requests (docs/performance.md).
    gc.collect()
    gc.freeze()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, reload_config, gateway, load_config)
    if _stopping:  # told to stop while starting (a worker, by the parent's handler): stop in order now
        stop.set()
    await stop.wait()
    notify("STOPPING=1")
    for sig in (signal.SIGTERM, signal.SIGINT):  # a second signal (the parent passes it on too) changes nothing
        loop.remove_signal_handler(sig)
        signal.signal(sig, signal.SIG_IGN)
    drain = gateway.config.get("server.drain_seconds")  # as last reloaded
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
    worker_exited(os.getpid())
    if pid_path:
        remove_pid_file(pid_path)
    log.info("stopped")


def log_providers(config: Config) -> None:
    """One line naming the providers this server can call and those whose key is not set."""
    ready = [name for name, p in config.providers.items() if p.api_key]
    missing = [f"{name} (set {KEY_ENV[name]})" for name, p in config.providers.items() if not p.api_key]
    log.info("providers with a key: %s%s", ", ".join(ready) or "none",
             f"; without one (their calls answer 503): {', '.join(missing)}" if missing else "")


def reload_config(gateway: Gateway, load_config: Callable[[], Config] | None) -> None:
    """SIGHUP: read the config file (and env file) again and apply it to the next request; a file that does not
    load leaves the running config as it was."""
    if load_config is None:
        log.warning("SIGHUP: this server was not started from a config it can read again; nothing changed")
        return
    notify(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}")
    try:
        config = load_config()
    except Exception as e:  # ConfigError, a vanished file, bad TOML: the old config stays
        log.error("config not reloaded, the running one stays: %s", e)
        notify("READY=1")
        return
    needs_restart = gateway.reload(config)
    log.info("config reloaded: %d budget rules, %d admins; applies to the next request", len(config.budgets),
             len(config.admins))
    if needs_restart:
        log.warning("changed settings that take effect only after a restart: %s", ", ".join(needs_restart))
    notify("READY=1")


def _stop_with_parent(parent: int) -> None:
    """In a forked worker (Linux): get SIGTERM when the parent dies, so stopping the parent stops every worker
    (rather than leaving them serving the port with nobody to restart them)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux
        return
    if os.getppid() != parent:  # the parent died before prctl
        os.kill(os.getpid(), signal.SIGTERM)


def _workers_of(parent: int) -> list[int]:
    """The pids of parent's child processes (Linux /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == parent:
                        found.append(int(entry))
            except (OSError, ValueError, IndexError):
                continue
    return found


_stopping: list[int] = []  # stop signals received: by the parent of workers, or by a worker while it started


def _pass_stop_to_workers() -> None:
    """In the parent of forked workers: SIGTERM or SIGINT is handed to every worker, each of which drains and exits 0,
    after which Tornado's fork_processes exits 0 too (rather than the parent dying at once and leaving its
    workers to be told by PR_SET_PDEATHSIG)."""
    parent = os.getpid()

    def handle(sig, frame) -> None:
        _stopping.append(sig)  # a worker Tornado restarts from now on stops at once (run() checks this)
        if os.getpid() != parent:  # a worker between fork and its own handlers: it stops once it has started
            return  # (_serve looks), since leaving mid-start would leave its store's thread behind
        for pid in _workers_of(parent):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    def pass_on(sig, frame) -> None:
        if os.getpid() == parent:
            for pid in _workers_of(parent):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, handle)
    signal.signal(signal.SIGHUP, pass_on)  # each worker reloads its config


def run(config: Config, host: str, port: int, processes: int = 1,
        load_config: Callable[[], Config] | None = None) -> None:
    """Bind, optionally fork worker processes, and serve until SIGTERM/SIGINT; SIGHUP re-reads the config through
    load_config."""
    try:
        sockets = tornado.netutil.bind_sockets(port, host)
    except OSError as e:  # port taken (another server?) or address not on this machine
        log.error("cannot listen on %s:%d: %s", host, port, e.strerror or e)
        raise SystemExit(1) from None
    if processes > 1 and url_scheme(config.get("storage.url")) == "sqlite":
        log.warning("%d processes on one SQLite file admit every call through the file, which measured slower than one "
                    "process on its own (docs/performance.md); PostgreSQL is what scales across processes", processes)
    if processes > 1:
        # one scrape of /metrics shows every worker: their values go to files in one folder
        use_multiprocess_folder(os.path.join(tempfile.gettempdir(), f"aipipe-metrics-{os.getpid()}"))
        write_each_line()  # the workers share standard error: one whole line per write
        gc.freeze()  # what the parent loaded stays shared with the workers instead of being copied by the collector
        parent = os.getpid()
        _pass_stop_to_workers()
        pid_path = pid_file_for(config)
        if write_pid_file(pid_path):  # `aipipe reload` signals the parent, which passes it on
            atexit.register(remove_pid_file, pid_path)  # (a worker's exit leaves it: it names the parent)
        tornado.process.fork_processes(processes)
        if _stopping:  # restarted by Tornado while the parent was stopping: nothing to serve
            raise SystemExit(0)
        _stop_with_parent(parent)
    _install_fast_loop()
    try:
        asyncio.run(_serve(config, sockets, processes, load_config))
    except KeyboardInterrupt:
        sys.exit(0)
