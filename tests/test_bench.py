"""The benchmark harness runs end to end: every arm answers, nothing fails, every gateway call is billed."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time

import pytest

from .bench import round_order
from .bench_procs import ROOT, wait_quiet


def run_bench(tmp_path, *args: str, timeout: float = 120) -> dict:
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "tests.bench", "--quick", "--json", str(out), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| case | arm |" in proc.stdout
    return json.loads(out.read_text())


def rows_by_arm(result: dict, case: str) -> dict:
    return {r["arm"]: r for r in result["cases"] if r["case"] == case}


def test_rounds_alternate_the_order_of_the_proxies_between_two_direct_runs():
    arms = ["direct", "passthrough", "gateway", "litellm"]
    assert round_order(arms, 0) == ["direct", "passthrough", "gateway", "litellm", "direct#again"]
    assert round_order(arms, 1) == ["direct", "litellm", "gateway", "passthrough", "direct#again"]
    assert round_order(arms, 2) == round_order(arms, 0)
    assert round_order(["gateway-p1", "gateway-p2"], 1) == ["gateway-p2", "gateway-p1"]


def test_waiting_for_a_server_to_go_quiet_ends_at_once_when_idle_and_at_the_timeout_when_busy():
    idle = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    busy = subprocess.Popen([sys.executable, "-c", "import time\nend = time.time() + 30\nwhile time.time() < end: pass"])
    try:
        time.sleep(0.5)  # both started
        started = time.monotonic()
        wait_quiet(idle, timeout=3.0)
        assert time.monotonic() - started < 3.0  # it saw the server quiet, before its timeout
        started = time.monotonic()
        wait_quiet(busy, timeout=0.6)
        assert time.monotonic() - started >= 0.6  # it waited the timeout out
    finally:
        idle.kill()
        busy.kill()


def test_quick_bench_serves_every_arm_without_errors_and_bills_every_gateway_call(tmp_path):
    result = run_bench(tmp_path, "--scenarios", "1", "--concurrency", "32")
    rows = rows_by_arm(result, "1 chat c=32")
    assert set(rows) == {"direct", "passthrough", "gateway"}
    for arm, row in rows.items():
        assert row["errors"] == 0, arm
        assert row["ok"] > 0 and row["rps"] > 0, arm
    gateway = rows["gateway"]
    assert gateway["billed"] >= gateway["ok"]  # requests cut off by the end of the run are billed too
    assert gateway["rss"] > 0
    for arm in ("passthrough", "gateway"):  # the server's CPU time per answered request, from /proc
        assert 0 < rows[arm]["cpu_ms"] < 1000, arm
    together = rows_by_arm(result, "1 chat c=32 side by side")  # both loaded at once, sharing core 0
    assert set(together) == {"passthrough", "gateway"}
    for arm, row in together.items():
        assert row["errors"] == 0 and row["ok"] > 0 and 0 < row["cpu_ms"] < 1000, arm
    assert together["gateway"]["billed"] >= together["gateway"]["ok"]
    assert together["gateway"]["x_passthrough"] > 0
    assert any(t["target"].endswith("side by side on one core") for t in result["targets"])


@pytest.mark.slow
def test_quick_streams_and_held_streams_are_all_relayed_and_billed(tmp_path, request):
    if "slow" not in (request.config.getoption("-m") or ""):
        pytest.skip("about 30 s: run with -m slow")
    result = run_bench(tmp_path, "--scenarios", "2,3", "--concurrency", "8", timeout=300)
    for arm, row in rows_by_arm(result, "2 stream50 c=8").items():
        assert row["errors"] == 0 and row["ttfb_p50"] > 0, arm
    held = rows_by_arm(result, "3 hold 200 streams")["gateway"]
    assert held["ok"] == 200 and held["errors"] == 0 and not held["stalled"]
    assert held["billed"] == 200


@pytest.mark.slow
def test_instruction_counts_are_taken_for_both_servers(request):
    if "slow" not in (request.config.getoption("-m") or ""):
        pytest.skip("about a minute under valgrind: run with -m slow")
    if shutil.which("valgrind") is None:
        pytest.skip("valgrind is not installed")
    from .bench_instructions import main
    rows = {r["arm"]: r for r in main(["--requests", "16"])}
    assert set(rows) == {"gateway", "passthrough"}
    for arm, row in rows.items():
        assert row["ok"] == 16 and row["errors"] == 0, arm
        assert 100_000 < row["per_call"] < 100_000_000, arm  # a Python server's call, not zero, not the start-up


@pytest.mark.slow
def test_opcode_counts_are_taken_per_function_for_both_servers(request):
    if "slow" not in (request.config.getoption("-m") or ""):
        pytest.skip("about half a minute under a tracer: run with -m slow")
    from .bench_opcodes import main
    results = main(["--requests", "16", "--top", "5"])
    gateway, passthrough = results["gateway"], results["passthrough"]
    assert 1_000 < sum(passthrough.values()) < sum(gateway.values()) < 1_000_000  # per call, not the start-up
    assert any(key.startswith("aipipe/handlers/proxy.py:") for key in gateway)  # the gateway's own code is counted
    assert not any(key.startswith("aipipe/") for key in passthrough)
