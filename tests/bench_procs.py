"""The benchmark's servers: start them pinned to a core, wait until they answer, read their memory, kill them.

Every child is recorded in CHILDREN and killed (with its process group) at exit, even on Ctrl-C.
"""
from __future__ import annotations

import atexit
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request

from aipipe.auth import mint_token

CHILDREN: list[subprocess.Popen] = []
SECRET = "bench-secret-0123456789abcdef-not-for-production"
OPERATOR_KEY = "sk-bench-operator"
LITELLM_KEY = "sk-bench-master-key"
USERS = [f"user{i:02d}@bench.example" for i in range(64)]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pin_prefix(cpus: str | None) -> list[str]:
    """`taskset -c cpus` when there is more than one core to share out."""
    return ["taskset", "-c", cpus] if cpus else []


def spawn(cmd: list[str], log_path: str, cpus: str | None, env: dict | None = None, cwd: str | None = None) -> subprocess.Popen:
    """Start a child in its own process group, output to log_path."""
    log = open(log_path, "ab")
    proc = subprocess.Popen(pin_prefix(cpus) + cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd or ROOT,
                            start_new_session=True)
    log.close()
    CHILDREN.append(proc)
    return proc


def stop(proc: subprocess.Popen, grace: float = 5.0) -> None:
    """SIGTERM the child's group, then SIGKILL after grace seconds."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
        except ProcessLookupError:
            pass
    if proc in CHILDREN:
        CHILDREN.remove(proc)


@atexit.register
def stop_all() -> None:
    for proc in list(CHILDREN):
        try:
            stop(proc, grace=3.0)
        except Exception:
            pass


def wait_http(port: int, path: str, proc: subprocess.Popen, timeout: float, log_path: str) -> None:
    """Wait until GET path answers (any status) or fail with the child's log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
                if s.recv(16).startswith(b"HTTP/1."):
                    return
        except OSError:
            pass
        time.sleep(0.1)
    with open(log_path, errors="replace") as f:
        tail = f.read()[-2000:]
    raise RuntimeError(f"server on port {port} did not come up ({'exited' if proc.poll() is not None else 'timeout'}):\n{tail}")


def tree(pid: int) -> list[int]:
    """pid and all its descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def server_pids(proc: subprocess.Popen) -> list[int]:
    """The Python processes of a server (taskset execs in place, so proc.pid is the server)."""
    return tree(proc.pid)


def reset_peak_rss(proc: subprocess.Popen) -> None:
    """Zero VmHWM so the next reading is this measurement's peak (Linux: clear_refs 5)."""
    for pid in server_pids(proc):
        try:
            with open(f"/proc/{pid}/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass


def peak_rss_mb(proc: subprocess.Popen) -> float:
    """Sum of VmHWM over the server's processes, MB."""
    total = 0
    for pid in server_pids(proc):
        try:
            with open(f"/proc/{pid}/status") as f:
                total += next((int(line.split()[1]) for line in f if line.startswith("VmHWM:")), 0)
        except OSError:
            pass
    return total / 1024


def cpu_seconds(proc: subprocess.Popen) -> float:
    """User + system CPU time used so far by the server's processes (Linux /proc), in seconds."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in server_pids(proc):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of proc(5))
        except (OSError, ValueError, IndexError):
            pass
    return total / ticks


def wait_quiet(proc: subprocess.Popen, timeout: float = 5.0, step: float = 0.2, busy: float = 0.1) -> None:
    """Wait (up to timeout seconds) until the server uses under `busy` of a core over `step` seconds: a server
    still working off requests a load run left it would take CPU from the next arm measured on its core."""
    deadline = time.monotonic() + timeout
    last = cpu_seconds(proc)
    while time.monotonic() < deadline:
        time.sleep(step)
        now = cpu_seconds(proc)
        if now - last < busy * step:
            return
        last = now


def tokens() -> list[str]:
    return [mint_token(email, SECRET) for email in USERS]


def write_config(folder: str, store_url: str, upstream_port: int, admission: str = "auto") -> str:
    """A benchmark gateway's config.toml in folder (large budgets, the fake upstream as OpenAI); its path."""
    path = os.path.join(folder, "config.toml")
    with open(path, "w") as f:
        f.write(f'[storage]\nurl = "{store_url}"\nadmission = "{admission}"\n'
                f'[budget]\n"*" = {{ limit = 1000000.0, days = 1 }}\n'
                f'[limits]\nmax_concurrent_per_user = 2000\n'
                f'[providers.openai]\nbase_url = "http://127.0.0.1:{upstream_port}"\n')
    return path


def counted_server(arm: str, folder: str, port: int, upstream_port: int) -> tuple[list[str], str, str, dict]:
    """For the counting tools (bench_instructions, bench_opcodes): the module and arguments to run after
    `python -m`, the chat path, the working folder and the environment of the bench passthrough (arm
    "passthrough") or the gateway (SQLite in folder)."""
    env = {**os.environ, "AIPIPE_SECRET": SECRET, "OPENAI_API_KEY": OPERATOR_KEY}
    if arm == "passthrough":
        argv = ["tests.bench_passthrough", "--port", str(port), "--upstream", f"http://127.0.0.1:{upstream_port}"]
        return argv, "/v1/chat/completions", ROOT, env
    config = write_config(folder, f"sqlite:///{folder}/aipipe.db", upstream_port)
    argv = ["aipipe", "serve", "--config", config, "--env-file", os.path.join(folder, "none.env"), "--port", str(port)]
    return argv, "/openai/v1/chat/completions", folder, env


def start_fake_upstream(work: str, name: str = "upstream") -> int:
    """tests.bench_upstream on a free port, its streams set to 50 events sent at once; its port."""
    port, log = free_port(), os.path.join(work, f"{name}.log")
    proc = spawn([sys.executable, "-m", "tests.bench_upstream", "--port", str(port)], log, None)
    wait_http(port, "/", proc, 20, log)
    url = f"http://127.0.0.1:{port}/_bench/config?events=50&interval=0"
    urllib.request.urlopen(urllib.request.Request(url, method="POST"), timeout=5).read()
    return port


class Gateway:
    """`python -m aipipe serve` with SQLite in workdir, pointed at the fake upstream."""

    def __init__(self, workdir: str, upstream_port: int, cpus: str | None, processes: int = 1, name: str = "gateway",
                 pythonpath: str | None = None, store: str | None = None, admission: str = "auto"):
        self.dir = os.path.join(workdir, name)
        os.makedirs(self.dir, exist_ok=True)
        self.db = os.path.join(self.dir, "aipipe.db")
        self.pg = store  # a postgresql:// URL: the gateway gets a fresh schema of its own there
        self.schema = f"bench_{os.getpid()}_{name.replace('-', '_')}"
        url = f"{store}{'&' if '?' in store else '?'}schema={self.schema}" if store else f"sqlite:///{self.db}"
        self.port = free_port()
        config = write_config(self.dir, url, upstream_port, admission)
        env = {**os.environ, "AIPIPE_SECRET": SECRET, "OPENAI_API_KEY": OPERATOR_KEY}
        if pythonpath:  # an edited copy of the package, for A/B runs (see --alt-tree)
            env["PYTHONPATH"] = pythonpath
        self.log = os.path.join(self.dir, "server.log")
        self.proc = spawn([sys.executable, "-m", "aipipe", "serve", "--config", config, "--env-file",
                           os.path.join(self.dir, "none.env"), "--port", str(self.port), "--processes", str(processes)],
                          self.log, cpus, env=env, cwd=self.dir)
        wait_http(self.port, "/usage", self.proc, 30, self.log)

    def ledger(self) -> tuple[int, int, float]:
        """(max id, billed request rows, their cost) read straight from the database."""
        table = f"{self.schema}.ledger" if self.pg else "ledger"
        query = (f"SELECT COALESCE(MAX(id), 0), COUNT(*), COALESCE(SUM(cost), 0) FROM {table} "
                 "WHERE kind = 'request' AND status = 200 AND cost > 0")
        if self.pg:
            out = subprocess.run(["psql", self.pg.split("?")[0], "-At", "-F", " ", "-c", query],
                                 capture_output=True, text=True, timeout=30, check=True).stdout.split()
            return int(out[0]), int(out[1]), float(out[2])
        with sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=30) as db:
            row = db.execute(query).fetchone()
        return int(row[0]), int(row[1]), float(row[2])

    def drop_schema(self) -> None:
        """Remove the Postgres schema this gateway used (nothing to do for SQLite)."""
        if self.pg:
            subprocess.run(["psql", self.pg.split("?")[0], "-q", "-c", f"DROP SCHEMA IF EXISTS {self.schema} CASCADE"],
                           capture_output=True, timeout=60)

    def settled(self, timeout: float = 15.0) -> tuple[int, float]:
        """Billed rows and cost once the ledger stops growing (the writer batches)."""
        deadline, last, stable_since = time.monotonic() + timeout, None, time.monotonic()
        while time.monotonic() < deadline:
            now = self.ledger()
            if now != last:
                last, stable_since = now, time.monotonic()
            elif time.monotonic() - stable_since > 1.0:
                break
            time.sleep(0.2)
        return last[1], last[2]
