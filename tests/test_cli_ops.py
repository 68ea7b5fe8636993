"""Running it for months on one box: the systemd unit, sd_notify, reload through the pid file, and backups."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time

import pytest

from aipipe import systemd
from aipipe.config import build_config

from .helpers import wait_serving
from .server_process import write_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECRET_ENV = {"AIPIPE_SECRET": "s" * 40}


def run(*args, cwd, env=None, timeout=60):
    full_env = {k: v for k, v in os.environ.items() if k not in ("AIPIPE_SECRET", "ADMIN_EMAILS", "NOTIFY_SOCKET")}
    full_env.update({"PYTHONPATH": REPO, **(env or {})})
    return subprocess.run([sys.executable, "-m", "aipipe", *args], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=timeout)


def unit_settings(text: str) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            settings.setdefault(key, []).append(value)
    return settings


# --- the unit -------------------------------------------------------------------------------------------------

def test_systemd_unit_runs_this_aipipe_with_hardening_and_a_stop_timeout_beyond_the_drain(tmp_path):
    write_config(str(tmp_path / "config.toml"), {"server": {"drain_seconds": 45.5},
                                                 "storage": {"url": "sqlite:////srv/aipipe data/aipipe.db"}})
    r = run("systemd-unit", "--config", "config.toml", "--env-file", "aipipe.env", "--user", "gateway", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    unit = unit_settings(r.stdout)
    exec_start = unit["ExecStart"][0]
    assert os.path.isabs(exec_start.split()[0]) and os.access(exec_start.split()[0], os.X_OK)
    assert exec_start.endswith(f" serve --config {tmp_path}/config.toml --env-file {tmp_path}/aipipe.env")
    expected = {
        "EnvironmentFile": f"{tmp_path}/aipipe.env", "User": "gateway", "Group": "gateway",
        "StateDirectory": "aipipe", "WorkingDirectory": "/var/lib/aipipe", "Restart": "on-failure",
        "LimitNOFILE": "65536", "Wants": "network-online.target", "After": "network-online.target",
        "NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes",
        "TimeoutStopSec": "76", "Type": "notify", "NotifyAccess": "main", "ExecReload": "/bin/kill -HUP $MAINPID",
        "KillMode": "mixed", "ReadWritePaths": '/var/lib/aipipe "/srv/aipipe data"', "WantedBy": "multi-user.target",
    }
    assert {k: unit[k][0] for k in expected} == expected


def test_systemd_unit_lets_workers_notify_when_there_are_several(tmp_path):
    write_config(str(tmp_path / "config.toml"), {"server": {"processes": 4},
                                                 "storage": {"url": "postgresql://aipipe@127.0.0.1/aipipe"}})
    r = run("systemd-unit", "--config", "config.toml", cwd=tmp_path)
    unit = unit_settings(r.stdout)
    assert unit["NotifyAccess"] == ["all"] and unit["ReadWritePaths"] == ["/var/lib/aipipe"]
    assert unit["TimeoutStopSec"] == ["60"] and unit["EnvironmentFile"] == ["/etc/aipipe/aipipe.env"]


@pytest.mark.parametrize("args, needle", [
    (("--user", "Root Admin"), "is not a user name"),
    (("--config", "missing.toml"), None),  # not written yet: a warning, and the defaults
])
def test_systemd_unit_options(tmp_path, args, needle):
    r = run("systemd-unit", *args, cwd=tmp_path)
    if needle:
        assert r.returncode == 1 and needle in r.stderr and "Traceback" not in r.stderr
    else:
        assert r.returncode == 0 and "does not exist yet" in r.stderr and "TimeoutStopSec=60" in r.stdout


def test_systemd_unit_warns_when_aipipe_lives_where_protecthome_hides_it(tmp_path):
    r = run("systemd-unit", cwd=tmp_path)
    program = unit_settings(r.stdout)["ExecStart"][0].split()[0]
    hidden = program.startswith(("/home/", "/root/", "/run/user/"))
    assert ("ProtectHome=yes hides" in r.stderr) == hidden


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed (apt-get install systemd)")
def test_systemd_unit_passes_systemd_analyze_verify(tmp_path):
    (tmp_path / "etc").mkdir()
    write_config(str(tmp_path / "etc" / "config.toml"), {"server": {"drain_seconds": 10.0}})
    (tmp_path / "etc" / "aipipe.env").write_text("AIPIPE_SECRET=" + "v" * 40 + "\n")
    r = run("systemd-unit", "--config", f"{tmp_path}/etc/config.toml", "--env-file", f"{tmp_path}/etc/aipipe.env",
            cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    (tmp_path / "units").mkdir()
    (tmp_path / "units" / "aipipe.service").write_text(r.stdout)
    check = subprocess.run(["systemd-analyze", "verify", str(tmp_path / "units" / "aipipe.service")],
                           capture_output=True, text=True, timeout=120)
    assert check.returncode == 0, check.stderr
    # verify reports unknown or malformed settings as warnings only, with exit 0: there must be none
    assert "aipipe.service" not in check.stderr, check.stderr


def test_exec_start_quoting_keeps_each_argument_one_word():
    assert systemd.quote_arg("/etc/aipipe/config.toml") == "/etc/aipipe/config.toml"
    assert systemd.quote_arg("/srv/my files/100%.toml") == '"/srv/my files/100%%.toml"'
    assert systemd.quote_arg("/a/$HOME") == "/a/$$HOME"
    with pytest.raises(ValueError):
        systemd.quote_arg("/a\nb")


# --- sd_notify -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("abstract", [False, True])
def test_notify_sends_the_state_to_notify_socket(tmp_path, monkeypatch, abstract):
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        if abstract:
            name = f"aipipe-test-{os.getpid()}-{time.monotonic_ns()}"
            listener.bind("\0" + name)
            monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        else:
            listener.bind(str(tmp_path / "notify"))
            monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
        assert systemd.notify("READY=1") is True
        assert systemd.notify("RELOADING=1\nMONOTONIC_USEC=123") is True
        assert listener.recv(4096) == b"READY=1"
        assert listener.recv(4096) == b"RELOADING=1\nMONOTONIC_USEC=123"


def test_notify_without_systemd_or_with_its_socket_gone_is_false(tmp_path, monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert systemd.notify("READY=1") is False
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    assert systemd.notify("STOPPING=1") is False


# --- pid file and reload -------------------------------------------------------------------------------------

def test_pid_file_sits_beside_an_sqlite_file_or_in_the_runtime_directory(tmp_path, monkeypatch):
    assert systemd.pid_file_for(build_config({"storage": {"url": f"sqlite:///{tmp_path}/a.db"}}, {})) == f"{tmp_path}/a.db.pid"
    postgres = build_config({"storage": {"url": "postgresql://u@127.0.0.1/test"}}, {})
    monkeypatch.delenv("RUNTIME_DIRECTORY", raising=False)
    monkeypatch.chdir(tmp_path)
    assert systemd.pid_file_for(postgres) == f"{tmp_path}/aipipe.pid"
    monkeypatch.setenv("RUNTIME_DIRECTORY", "/run/aipipe")
    assert systemd.pid_file_for(postgres) == "/run/aipipe/aipipe.pid"


def test_pid_file_is_written_whole_and_removed_only_by_its_own_process(tmp_path):
    path = str(tmp_path / "aipipe.db.pid")
    assert systemd.write_pid_file(path) and systemd.read_pid_file(path) == os.getpid()
    assert os.listdir(tmp_path) == ["aipipe.db.pid"]
    with open(path, "w") as f:
        f.write("1\n")  # a newer server's
    systemd.remove_pid_file(path)
    assert systemd.read_pid_file(path) == 1
    with open(path, "w") as f:
        f.write(f"{os.getpid()}\n")
    systemd.remove_pid_file(path)
    assert not os.path.exists(path)
    assert systemd.write_pid_file(str(tmp_path / "no" / "such" / "x.pid")) is False


# Stands in for the server: writes its pid file, then waits (bounded) for SIGHUP and records it.
FAKE_SERVER = """
import signal, sys, time
from aipipe.systemd import write_pid_file
got = []
signal.signal(signal.SIGHUP, lambda *a: got.append(1))
write_pid_file(sys.argv[1])
for _ in range(6000):
    if got:
        open(sys.argv[2], "w").write("reloaded")
        break
    time.sleep(0.01)
"""


def wait_for(predicate, tries: int = 3000) -> bool:
    for _ in range(tries):
        if predicate():
            return True
        time.sleep(0.01)
    return False


def test_reload_signals_the_server_named_in_its_pid_file(tmp_path):
    write_config(str(tmp_path / "config.toml"), {"storage": {"url": f"sqlite:///{tmp_path}/aipipe.db"}})
    (tmp_path / "aipipe_fake_server.py").write_text(FAKE_SERVER)  # "aipipe" in its command line, as the server's
    pid_file, marker = tmp_path / "aipipe.db.pid", tmp_path / "marker"
    child = subprocess.Popen([sys.executable, str(tmp_path / "aipipe_fake_server.py"), str(pid_file), str(marker)],
                             env={**os.environ, "PYTHONPATH": REPO})
    try:
        assert wait_for(pid_file.exists)
        r = run("reload", "--config", "config.toml", cwd=tmp_path, env=SECRET_ENV)
        assert r.returncode == 0 and r.stdout.strip() == f"aipipe: asked the server (pid {child.pid}) to reload"
        assert child.wait(timeout=60) == 0 and marker.read_text() == "reloaded"
    finally:
        child.kill()
        child.wait()


def test_reload_without_a_server_says_so_in_one_line(tmp_path):
    write_config(str(tmp_path / "config.toml"), {"storage": {"url": f"sqlite:///{tmp_path}/aipipe.db"}})
    r = run("reload", "--config", "config.toml", cwd=tmp_path, env=SECRET_ENV)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "no server is running" in r.stderr
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (tmp_path / "aipipe.db.pid").write_text(f"{gone.pid}\n")  # left behind by a crash
    r = run("reload", "--config", "config.toml", cwd=tmp_path, env=SECRET_ENV)
    assert r.returncode == 1 and "no server is running" in r.stderr and "Traceback" not in r.stderr


def test_reload_never_signals_another_program_that_got_a_stale_pid(tmp_path):
    write_config(str(tmp_path / "config.toml"), {"storage": {"url": f"sqlite:///{tmp_path}/aipipe.db"}})
    other = subprocess.Popen([sys.executable, "-c", "import time\nfor _ in range(6000): time.sleep(0.01)"])
    try:
        (tmp_path / "aipipe.db.pid").write_text(f"{other.pid}\n")
        r = run("reload", "--config", "config.toml", cwd=tmp_path, env=SECRET_ENV)
        assert r.returncode == 1 and "is not aipipe" in r.stderr
        assert other.poll() is None  # SIGHUP would have ended it
    finally:
        other.kill()
        other.wait()


# --- backup --------------------------------------------------------------------------------------------------

# Writes to the ledger and the usage totals in one transaction at a time, until told to stop (bounded).
WRITER = """
import os, sqlite3, sys
con = sqlite3.connect(sys.argv[1], timeout=30, isolation_level=None)
for i in range(20000):
    if os.path.exists(sys.argv[2]):
        break
    con.execute("BEGIN IMMEDIATE")
    con.execute("INSERT INTO ledger (ts, email, date, kind, cost) VALUES (?, 'w@example.com', '2026-01-01', 'request', 0.001)", (i,))
    con.execute("INSERT INTO usage (email, date, cost) VALUES ('w@example.com', '2026-01-01', 0.001) "
                "ON CONFLICT (email, date) DO UPDATE SET cost = cost + excluded.cost")
    con.execute("COMMIT")
    if i == 50:
        open(sys.argv[3], "w").close()
"""


def ledger_rows(path) -> list[tuple]:
    con = sqlite3.connect(path)
    try:
        return con.execute("SELECT id, ts, email, date, kind, cost FROM ledger ORDER BY id").fetchall()
    finally:
        con.close()


def test_backup_while_the_server_runs_and_another_process_writes_is_consistent(tmp_path):
    write_config(str(tmp_path / "config.toml"), {"storage": {"url": f"sqlite:///{tmp_path}/aipipe.db"}})
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "aipipe", "serve", "--config", "config.toml", "--port", str(port)],
                              cwd=tmp_path, env={**os.environ, **SECRET_ENV, "PYTHONPATH": REPO},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    stop, started = tmp_path / "stop", tmp_path / "started"
    writer = None
    try:
        assert wait_serving(port, server), "server did not start"
        writer = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path / "aipipe.db"), str(stop), str(started)])
        assert wait_for(started.exists)
        for n in range(3):  # each a snapshot while rows keep arriving
            r = run("backup", f"copy{n}.db", "--config", "config.toml", cwd=tmp_path, env=SECRET_ENV)
            assert r.returncode == 0, r.stderr
            assert r.stdout.startswith(f"aipipe: backed up {tmp_path}/aipipe.db to copy{n}.db (")
            con = sqlite3.connect(tmp_path / f"copy{n}.db")
            try:
                assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
                count, total = con.execute("SELECT count(*), sum(cost) FROM ledger").fetchone()
                usage = con.execute("SELECT cost FROM usage WHERE email = 'w@example.com'").fetchone()[0]
                assert count > 50 and abs(total - usage) < 1e-9  # both tables as of one commit
            finally:
                con.close()
            assert not os.path.exists(tmp_path / f"copy{n}.db-wal")  # one self-contained file
    finally:
        stop.touch()
        if writer is not None:
            writer.wait(timeout=60)
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)


def test_backup_restored_gives_back_the_same_ledger(tmp_path):
    db = tmp_path / "aipipe.db"
    write_config(str(tmp_path / "config.toml"), {"storage": {"url": f"sqlite:///{db}"}})
    assert run("migrate", "--config", "config.toml", cwd=tmp_path, env=SECRET_ENV).returncode == 0
    for day, cost in (("2026-01-01", "0.25"), ("2026-01-02", "1.5")):
        assert run("set-cost", "pat@example.com", day, cost, "--config", "config.toml", cwd=tmp_path,
                   env=SECRET_ENV).returncode == 0
    before = ledger_rows(db)
    assert len(before) == 2
    assert run("backup", "saved.db", "--config", "config.toml", cwd=tmp_path, env=SECRET_ENV).returncode == 0
    assert run("set-cost", "pat@example.com", "2026-01-03", "9", "--config", "config.toml", cwd=tmp_path,
               env=SECRET_ENV).returncode == 0
    assert ledger_rows(db) != before
    for leftover in ("aipipe.db-wal", "aipipe.db-shm"):  # restore as docs/operating.md says: server stopped
        (tmp_path / leftover).unlink(missing_ok=True)
    shutil.copyfile(tmp_path / "saved.db", db)
    assert ledger_rows(db) == before
    r = run("usage", "--config", "config.toml", cwd=tmp_path, env=SECRET_ENV)
    assert r.returncode == 0 and '"cost": 1.5' in r.stdout and '"cost": 9' not in r.stdout


def test_backup_refuses_to_overwrite_without_force_and_postgres_is_pg_dumps_job(tmp_path):
    write_config(str(tmp_path / "config.toml"), {"storage": {"url": f"sqlite:///{tmp_path}/aipipe.db"}})
    assert run("migrate", "--config", "config.toml", cwd=tmp_path, env=SECRET_ENV).returncode == 0
    (tmp_path / "taken.db").write_text("precious")
    r = run("backup", "taken.db", "--config", "config.toml", cwd=tmp_path, env=SECRET_ENV)
    assert r.returncode == 1 and "--force" in r.stderr and (tmp_path / "taken.db").read_text() == "precious"
    r = run("backup", "taken.db", "--force", "--config", "config.toml", cwd=tmp_path, env=SECRET_ENV)
    assert r.returncode == 0 and ledger_rows(tmp_path / "taken.db") == []
    r = run("backup", "no/such/folder/x.db", "--config", "config.toml", cwd=tmp_path, env=SECRET_ENV)
    assert r.returncode == 1 and r.stderr.startswith("aipipe: cannot back up") and r.stderr.count("\n") == 1
    write_config(str(tmp_path / "pg.toml"), {"storage": {"url": "postgresql://postgres:hunter2@127.0.0.1:5432/test"}})
    r = run("backup", "x.db", "--config", "pg.toml", cwd=tmp_path, env=SECRET_ENV)
    assert r.returncode == 1 and "pg_dump" in r.stderr and r.stderr.count("\n") == 1 and "hunter2" not in r.stderr
    assert sorted(os.listdir(tmp_path)) == ["aipipe.db", "config.toml", "pg.toml", "taken.db"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
