"""Running under systemd: the unit `aipipe systemd-unit` prints, sd_notify, and the pid file `aipipe reload` reads.

sd_notify is one datagram to the socket systemd names in $NOTIFY_SOCKET, so no package is needed for it.
"""
from __future__ import annotations

import logging
import math
import os
import re
import shutil
import socket
import sys

from .config import Config
from .storage import sqlite_path, url_scheme

log = logging.getLogger("aipipe")

STATE_DIR = "/var/lib/aipipe"  # StateDirectory=aipipe: the SQLite file, its spool and pid file live here
USER_NAME = re.compile(r"[a-z_][a-z0-9_-]{0,30}")
STOP_MARGIN = 30  # seconds TimeoutStopSec allows beyond the drain, for writing charges and closing the store

UNIT = """\
# Written by `aipipe systemd-unit`. Install:
#   aipipe systemd-unit ... > /etc/systemd/system/aipipe.service
#   systemctl daemon-reload && systemctl enable --now aipipe
[Unit]
Description=AI Pipe LLM gateway
Wants=network-online.target
After=network-online.target

[Service]
Type=notify
# {notify_why}
NotifyAccess={notify_access}
ExecStart={exec_start}
ExecReload=/bin/kill -HUP $MAINPID
EnvironmentFile={env_file}
User={user}
Group={user}
StateDirectory=aipipe
WorkingDirectory={state_dir}
Restart=on-failure
RestartSec=2
# SIGTERM to the server alone (it stops its workers itself), SIGKILL to what is left after TimeoutStopSec
KillMode=mixed
# server.drain_seconds ({drain:g} s) for open requests to finish, then {margin} s to write their charges
TimeoutStopSec={stop_seconds}
LimitNOFILE=65536
NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes
ReadWritePaths={read_write}

[Install]
WantedBy=multi-user.target
"""


def aipipe_command() -> list[str]:
    """The absolute command line that runs this installation's `aipipe`."""
    argv0 = sys.argv[0]
    if os.path.basename(argv0) == "aipipe":  # started as the console script itself
        found = argv0 if os.sep in argv0 else shutil.which(argv0)
        if found:
            return [os.path.abspath(found)]
    # `python -m aipipe`: the console script of this interpreter's environment, not another one on $PATH
    beside = os.path.join(os.path.dirname(os.path.abspath(sys.executable)), "aipipe")
    if os.access(beside, os.X_OK):
        return [beside]
    found = shutil.which("aipipe")
    return [os.path.abspath(found)] if found else [os.path.abspath(sys.executable), "-m", "aipipe"]


def quote_arg(arg: str) -> str:
    """arg as one word of an ExecStart= line (systemd.service(5), "Command lines")."""
    if "\n" in arg or "\r" in arg:
        raise ValueError(f"{arg!r} cannot stand in a unit file")
    arg = arg.replace("%", "%%").replace("$", "$$")  # specifiers and variable expansion
    if re.search(r"[\s\"'\\;]", arg):
        return '"' + arg.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return arg


def unit_text(config: Config, config_path: str, env_file: str, user: str = "aipipe") -> str:
    """The systemd service unit that runs `aipipe serve` with config_path and env_file (absolute paths)."""
    if not USER_NAME.fullmatch(user):
        raise ValueError(f"{user!r} is not a user name systemd accepts (lower-case letters, digits, _ and -)")
    for path in (config_path, env_file):
        if not os.path.isabs(path) or "\n" in path:
            raise ValueError(f"{path!r} must be an absolute path")
    read_write = [STATE_DIR]
    url = config.get("storage.url")
    if url_scheme(url) == "sqlite" and os.path.isabs(sqlite_path(url)):
        folder = os.path.dirname(sqlite_path(url))  # the file's -wal, lock and spool are made beside it
        if folder != STATE_DIR:
            read_write.append(folder)
    many = config.get("server.processes") > 1
    drain = config.get("server.drain_seconds")
    return UNIT.format(
        exec_start=" ".join(quote_arg(a) for a in [*aipipe_command(), "serve", "--config", config_path,
                                                    "--env-file", env_file]),
        notify_access="all" if many else "main",
        notify_why=("server.processes > 1: a worker, not the main process, says when it is ready" if many
                    else "the server itself (pid $MAINPID) says READY=1 once it listens"),
        env_file=env_file.replace("%", "%%"), user=user, state_dir=STATE_DIR,
        read_write=" ".join(quote_arg(p) for p in read_write), drain=drain, margin=STOP_MARGIN,
        stop_seconds=math.ceil(drain) + STOP_MARGIN)


def notify(state: str) -> bool:
    """Tell systemd `state` (READY=1, STOPPING=1, ...); False when not started by systemd or the send failed."""
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address:
        return False
    if address[0] == "@":  # an abstract socket: the name starts with a NUL byte
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(state.encode(), address)
        return True
    except OSError as e:
        log.warning("could not notify systemd (%s): %s", state.split("=", 1)[0], e.strerror or e)
        return False


def pid_file_for(config: Config) -> str:
    """Where the server of config keeps its pid: `<db file>.pid` beside an SQLite file, else `aipipe.pid` in
    $RUNTIME_DIRECTORY or the working folder."""
    url = config.get("storage.url")
    if url_scheme(url) == "sqlite" and sqlite_path(url) != ":memory:":
        return os.path.abspath(sqlite_path(url)) + ".pid"
    folder = os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0] or os.getcwd()
    return os.path.join(folder, "aipipe.pid")


def write_pid_file(path: str) -> bool:
    """Write this process's pid to path (whole, by rename); a pid file is a convenience, so False, not an error,
    when it cannot be written."""
    partial = f"{path}.{os.getpid()}.partial"
    try:
        with open(partial, "w") as f:
            f.write(f"{os.getpid()}\n")
        os.replace(partial, path)
        return True
    except OSError as e:
        log.warning("cannot write the pid file %s (`aipipe reload` will not find this server): %s", path,
                    e.strerror or e)
        try:
            os.unlink(partial)
        except OSError:
            pass
        return False


def read_pid_file(path: str) -> int | None:
    """The pid in path, or None when there is no such file or it holds no pid."""
    try:
        with open(path) as f:
            text = f.read(32).strip()
    except (FileNotFoundError, NotADirectoryError):
        return None
    return int(text) if text.isdigit() and int(text) > 0 else None


def remove_pid_file(path: str) -> None:
    """Remove path if it still names this process (a newer server may have written its own since)."""
    try:
        if read_pid_file(path) == os.getpid():
            os.unlink(path)
    except OSError:
        pass


def runs_aipipe(pid: int) -> bool:
    """Whether process pid is alive and (where /proc tells) runs aipipe: a stale pid file's number may have been
    given to some other program since, which SIGHUP would kill."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's: the signal itself will say so
        pass
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"aipipe" in f.read()
    except FileNotFoundError:
        return not os.path.isdir("/proc/self")  # gone since, or no /proc on this system
    except OSError:
        return True
