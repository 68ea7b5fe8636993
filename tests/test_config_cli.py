"""Configuration and the command line, as an operator meets them."""
from __future__ import annotations

import os
import re
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

from aipipe.config import ConfigError, build_config, load_config

from .helpers import serving, wait_serving

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args, cwd, env=None, timeout=30):
    full_env = {k: v for k, v in os.environ.items() if k not in ("AIPIPE_SECRET", "ADMIN_EMAILS")}
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "aipipe", *args], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=timeout)


def test_example_config_is_valid_and_budget_lookup_order():
    config = load_config(os.path.join(REPO, "config.example.toml"), {"ADMIN_EMAILS": "x@y.z,  w@v.u"})
    assert config.budget_for("blocked@example.com").limit == 0
    assert config.budget_for("someone@example.com").limit == 1.0
    assert config.budget_for("someone@else.org").limit == 0.1
    assert config.admins == {"admin@example.com", "x@y.z", "w@v.u"}
    assert build_config({}, {}).budget_for("a@b.c").limit == 0  # no rule at all -> zero limit


@pytest.mark.parametrize("data,needle", [
    ({"providers": {"mistral": {"base_url": "https://x"}}}, "providers.mistral"),
    ({"budget": {"*": {"limit": -1, "days": 7}}}, 'budget."*".limit'),
    ({"budget": {"*": {"limit": 1, "days": 0}}}, 'budget."*".days'),
    ({"budget": {"*": {"limit": 1, "period": "year"}}}, 'budget."*".period'),
    ({"server": {"prot": 1}}, "server.prot"),
    ({"storage": {"admission": "memory"}}, 'storage.admission must be one of "auto", "store"'),
    ({"server": {"port": "eighty"}}, "server.port"),
    ({"limits": {"hold_seconds": -5}}, "limits.hold_seconds"),
    ({"providers": {"openai": {"base_url": "ftp://x"}}}, "providers.openai.base_url"),
])
def test_bad_config_names_the_key(data, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.").replace("*", r"\*")):
        build_config(data, {})


def test_serve_refuses_bad_config_with_a_message_naming_the_key(tmp_path):
    (tmp_path / "bad.toml").write_text('[budget]\n"*" = { limit = -1, days = 7 }\n')
    r = run("serve", "--config", "bad.toml", cwd=tmp_path, env={"AIPIPE_SECRET": "x" * 32})
    assert r.returncode != 0 and 'budget."*".limit must not be negative' in r.stderr
    (tmp_path / "broken.toml").write_text("[server\nport = 1")
    r = run("serve", "--config", "broken.toml", cwd=tmp_path, env={"AIPIPE_SECRET": "x" * 32})
    assert r.returncode != 0 and "not valid TOML" in r.stderr


def test_serve_on_a_port_in_use_says_so_without_a_traceback(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = run("serve", "--port", str(port), cwd=tmp_path, env={"AIPIPE_SECRET": "x" * 32})
    assert r.returncode == 1 and f"cannot listen on 127.0.0.1:{port}" in r.stderr
    assert "Traceback" not in r.stderr


def test_short_secret_is_refused(tmp_path):
    r = run("serve", cwd=tmp_path, env={"AIPIPE_SECRET": "short"})
    assert r.returncode != 0 and "AIPIPE_SECRET is too short" in r.stderr


def test_first_run_generates_a_secret_that_survives_restarts(tmp_path):
    r = run("token", "me@example.com", cwd=tmp_path)
    assert r.returncode == 0 and "generated a new AIPIPE_SECRET" in r.stderr
    env_file = tmp_path / ".env"
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
    first = r.stdout.strip()
    r2 = run("token", "me@example.com", cwd=tmp_path)
    assert r2.stdout.strip() == first and "generated" not in r2.stderr


def test_cli_set_cost_usage_and_check_config(tmp_path):
    env = {"AIPIPE_SECRET": "y" * 32}
    assert run("migrate", cwd=tmp_path, env=env).returncode == 0
    r = run("set-cost", "Pat@Example.com", "2026-01-02", "0.25", cwd=tmp_path, env=env)
    assert r.returncode == 0 and "Cost for pat@example.com on 2026-01-02 set to 0.25" in r.stdout
    r = run("usage", cwd=tmp_path, env=env)
    assert '"cost": 0.25' in r.stdout and "pat@example.com" in r.stdout
    r = run("check-config", "--config", os.path.join(REPO, "config.example.toml"), cwd=tmp_path, env=env)
    assert r.returncode == 0 and "is valid" in r.stdout
    r = run("check-config", "--defaults", cwd=tmp_path, env=env)
    assert "max_concurrent_per_user = 8" in r.stdout


def test_serve_starts_serves_and_stops_on_sigterm(tmp_path):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    env = {**{k: v for k, v in os.environ.items() if k != "AIPIPE_SECRET"}, "AIPIPE_SECRET": "z" * 32}
    proc = subprocess.Popen([sys.executable, "-m", "aipipe", "serve", "--port", str(port)], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        # wait on another path: a probe that timed out would still be answered, and logged, later
        assert wait_serving(port, proc), "server did not start"
        secret = "tok-" + "q" * 20
        request = urllib.request.Request(f"http://127.0.0.1:{port}/nosuch/x?key={secret}",
                                         headers={"Authorization": f"Bearer {secret}"})
        with pytest.raises(urllib.error.HTTPError) as answer:
            urllib.request.urlopen(request, timeout=60)
        assert answer.value.code == 404
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=20)
        assert proc.returncode == 0 and "shutting down" in out
        # one access line per request, in the log's format, before the lines logged after it; no query, no token
        lines = out.splitlines()
        access = [i for i, line in enumerate(lines) if re.fullmatch(
            r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z WARNING aipipe\.access: 404 GET /nosuch/x \d+\.\dms 127\.0\.0\.1",
            line)]
        assert len(access) == 1 and access[0] < next(i for i, line in enumerate(lines) if "shutting down" in line)
        assert secret not in out
        assert (tmp_path / "aipipe.db").exists()
    finally:
        if proc.poll() is None:
            proc.kill()



def start_processes(tmp_path, n: int, **popen) -> tuple[subprocess.Popen, int]:
    """`aipipe serve --processes n` in a session of its own, once it serves (bounded: wait_serving's tries)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in ("AIPIPE_SECRET", "ADMIN_EMAILS")}
    env["AIPIPE_SECRET"] = "x" * 32
    proc = subprocess.Popen([sys.executable, "-m", "aipipe", "serve", "--processes", str(n), "--host", "127.0.0.1",
                             "--port", str(port)], cwd=tmp_path, env=env, start_new_session=True, **popen)
    wait_serving(port, proc)
    return proc, port


def test_several_processes_on_sqlite_are_warned_about_once_and_serve(tmp_path):
    proc, port = start_processes(tmp_path, 2, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert serving(port)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the whole group, as systemd and Ctrl-C do
        out = proc.communicate(timeout=30)[0]
    assert out.count("2 processes on one SQLite file admit every call through the file") == 1
    assert "PostgreSQL is what scales across processes" in out


def test_stopping_the_parent_of_several_processes_stops_them_all(tmp_path):
    proc, port = start_processes(tmp_path, 2, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert serving(port)
        proc.send_signal(signal.SIGTERM)  # the parent only, as `kill <pid>` does
        proc.wait(timeout=60)
        for _ in range(150):  # a worker left behind would go on answering
            if not serving(port):
                break
            time.sleep(0.1)
        assert not serving(port)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_workers_told_to_stop_while_they_start_stop_in_order(tmp_path):
    """SIGTERM as soon as the first worker serves, while the other may still be starting (systemd stopping a unit
    that just started): each worker still closes its store and exits, rather than hanging on the store's thread."""
    env = {**os.environ, "AIPIPE_SECRET": "x" * 32}
    for attempt in range(5):
        proc = subprocess.Popen([sys.executable, "-m", "aipipe", "serve", "--processes", "2", "--host", "127.0.0.1",
                                 "--port", "0"], cwd=tmp_path, env=env, start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            for line in proc.stderr:
                if "AI Pipe listening on" in line:
                    break
            proc.send_signal(signal.SIGTERM)
            rest = threading.Thread(target=proc.stderr.read, daemon=True)  # keep the pipe drained
            rest.start()
            assert proc.wait(timeout=60) == 0, f"attempt {attempt}"
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_version_and_a_help_line_for_every_command_and_option(tmp_path):
    import argparse

    from aipipe import __version__
    from aipipe.cli import build_parser

    r = run("--version", cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.strip() == f"aipipe {__version__}"
    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert {"serve", "backup", "reload", "systemd-unit"} <= set(commands.choices)
    assert all(choice.help for choice in commands._choices_actions)
    for name, sub in commands.choices.items():
        for action in sub._actions:
            assert action.help, f"aipipe {name} {action.option_strings or action.dest} has no help"


@pytest.mark.parametrize("args, needle", [
    (("token", "not-an-email"), "'not-an-email' is not an email address"),
    (("token", "pat@example.com", "--expires-in", "0"), "--expires-in must be a positive number of seconds"),
    (("token", "pat@example.com", "--expires-in", "-60"), "--expires-in must be a positive number of seconds"),
    (("set-cost", "pat@example.com", "2026-01-02", "nan"), "cost must be a number of USD, not negative"),
    (("set-cost", "pat@example.com", "2026-01-02", "inf"), "cost must be a number of USD, not negative"),
    (("set-cost", "pat@example.com", "2026-01-02", "-1"), "cost must be a number of USD, not negative"),
    (("set-cost", "pat@example.com", "2026-01-02", "1000001"), "cost must be at most 1,000,000 USD"),
    (("set-cost", "pat@example.com", "2026-13-45", "1"), "'2026-13-45' is not a date: use YYYY-MM-DD"),
    (("set-cost", "pat", "2026-01-02", "1"), "'pat' is not an email address"),
])
def test_commands_refuse_bad_arguments_in_one_line(tmp_path, args, needle):
    r = run(*args, cwd=tmp_path, env={"AIPIPE_SECRET": "x" * 32})
    assert r.returncode == 1 and r.stderr == f"aipipe: {needle}\n"
    assert not (tmp_path / "aipipe.db").exists()  # refused before anything was written


def test_set_cost_at_the_apis_bound_is_taken(tmp_path):
    from aipipe.handlers.admin import MAX_COST

    r = run("set-cost", "pat@example.com", "2026-01-02", repr(MAX_COST), cwd=tmp_path, env={"AIPIPE_SECRET": "x" * 32})
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("command", [("serve",), ("token", "pat@example.com")])
def test_an_env_file_that_cannot_be_written_is_one_line_not_a_traceback(tmp_path, command):
    r = run(*command, "--env-file", "/nonexistent/dir/.env", cwd=tmp_path)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.count("\n") == 1 and "cannot be saved to /nonexistent/dir/.env" in r.stderr


def test_an_env_file_that_cannot_be_read_is_one_line(tmp_path):
    (tmp_path / "env-dir").mkdir()
    r = run("check-config", "--env-file", "env-dir", cwd=tmp_path)
    assert r.returncode == 1 and r.stderr.startswith("aipipe: cannot read the env file env-dir") and "Traceback" not in r.stderr


@pytest.mark.parametrize("url, needle", [
    ("mysql://u:hunter2@db/aipipe", "must start with sqlite:/// or postgresql://"),
    ("sqlite://relative", "must look like sqlite:///path.db"),
    ("sqlite:///", "names no file"),
])
def test_check_config_refuses_the_storage_urls_serve_refuses(tmp_path, url, needle):
    (tmp_path / "c.toml").write_text(f'[storage]\nurl = "{url}"\n')
    for command in ("check-config", "serve"):
        r = run(command, "--config", "c.toml", cwd=tmp_path, env={"AIPIPE_SECRET": "x" * 32})
        assert r.returncode == 1 and needle in r.stderr and "hunter2" not in r.stderr, (command, r.stderr)


def test_check_config_names_the_provider_keys_set_and_missing_never_their_values(tmp_path):
    (tmp_path / ".env").write_text("GEMINI_API_KEY=AIzaSecretGeminiValue123\n")
    r = run("check-config", cwd=tmp_path, env={"AIPIPE_SECRET": "x" * 32, "OPENAI_API_KEY": "sk-secret-openai-value"})
    assert r.returncode == 0, r.stderr
    assert "provider keys set: OPENAI_API_KEY, GEMINI_API_KEY" in r.stdout
    assert "provider keys missing: OPENROUTER_API_KEY" in r.stdout
    assert "sk-secret-openai-value" not in r.stdout + r.stderr and "AIzaSecret" not in r.stdout + r.stderr
    r = run("check-config", cwd=tmp_path, env={"AIPIPE_SECRET": "short"})
    assert r.returncode == 1 and "AIPIPE_SECRET is too short" in r.stderr


def test_log_format_from_the_config_and_the_command_line_winning(tmp_path):
    import json

    (tmp_path / "json.toml").write_text('[server]\nlog_format = "json"\n')
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        as_json = run("serve", "--config", "json.toml", "--port", port, cwd=tmp_path, env={"AIPIPE_SECRET": "x" * 32})
        as_text = run("serve", "--config", "json.toml", "--port", port, "--log-format", "text", cwd=tmp_path,
                      env={"AIPIPE_SECRET": "x" * 32})
    entry = json.loads(as_json.stderr)  # one line, one object
    assert as_json.returncode == 1 and entry["level"] == "ERROR" and f"cannot listen on 127.0.0.1:{port}" in entry["message"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", entry["time"])
    assert re.fullmatch(rf"\S+Z ERROR aipipe: cannot listen on 127\.0\.0\.1:{port}: .*\n", as_text.stderr)
    r = run("serve", "--log-format", "json", "--config", "missing.toml", cwd=tmp_path, env={"AIPIPE_SECRET": "x" * 32})
    assert r.returncode == 1 and json.loads(r.stderr)["message"] == "config file missing.toml not found"


def test_tokens_and_costs_set_from_the_command_line_are_audited_and_usage_sees_runtime_rules(tmp_path):
    import asyncio
    import getpass

    from aipipe.storage import open_store

    env = {"AIPIPE_SECRET": "y" * 32}
    assert run("token", "pat@example.com", "--expires-in", "3600", cwd=tmp_path, env=env).returncode == 0
    assert run("set-cost", "pat@example.com", "2026-01-02", "0.25", cwd=tmp_path, env=env).returncode == 0

    async def audit_and_set_a_rule():
        store = await open_store(f"sqlite:///{tmp_path}/aipipe.db")
        try:
            rows = await store.audit()
            await store.set_budget_rule({"match": "pat@example.com", **{"limit": 7.5, "days": 3, "period": None,
                                                                       "models": []}}, "root@example.com", 0.0)
            return rows
        finally:
            await store.close()
    rows = asyncio.run(audit_and_set_a_rule())
    assert [(r["action"], r["target"], r["admin"]) for r in rows] == [
        ("cost.set", "pat@example.com", f"cli:{getpass.getuser()}"),
        ("token.mint", "pat@example.com", f"cli:{getpass.getuser()}")]
    assert all("eyJ" not in str(r) for r in rows)  # the token itself is never recorded
    usage = run("usage", "--email", "pat@example.com", cwd=tmp_path, env=env)
    assert usage.returncode == 0 and '"limit": 7.5' in usage.stdout  # the database's rule, not the file's 0
