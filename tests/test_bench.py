"""The benchmark harness runs end to end: every arm answers, nothing fails, every gateway call is billed."""
from __future__ import annotations

import itertools
import json
import shutil
import subprocess
import sys
import time

import pytest

from . import bench_procs
from .bench import round_order
from .bench_procs import ROOT


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


IDLE = "import time\nprint('started', flush=True)\ntime.sleep(30)"
QUIET = 0.1 * 0.2  # wait_quiet's defaults: under a tenth of a core over a 0.2 s step
BUSY = "import time\nend = time.time() + 30\nprint('started', flush=True)\nwhile time.time() < end: pass"


def watched_wait_quiet(monkeypatch, proc: subprocess.Popen, timeout: float) -> tuple[list[float], float]:
    """wait_quiet(proc, timeout): the CPU readings it took, and how long it waited."""
    readings: list[float] = []
    cpu_seconds = bench_procs.cpu_seconds

    def reading(p: subprocess.Popen) -> float:
        readings.append(cpu_seconds(p))
        return readings[-1]
    with monkeypatch.context() as patch:
        patch.setattr(bench_procs, "cpu_seconds", reading)
        begun = time.monotonic()
        bench_procs.wait_quiet(proc, timeout=timeout)
        return readings, time.monotonic() - begun


def test_waiting_for_a_server_to_go_quiet_ends_at_once_when_idle_and_at_the_timeout_when_busy(monkeypatch):
    """Judged on the CPU time wait_quiet read, not on the clock: it ends at the first step under a tenth of a
    core, and only at the timeout when every step was busier (a loaded machine may starve the busy process for
    a step, so that case is tried again, a bounded number of times)."""
    idle, busy = (subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
                  for code in (IDLE, BUSY))
    try:
        # started, and done with their start-up's CPU
        assert idle.stdout.readline() == "started\n" and busy.stdout.readline() == "started\n"
        readings, _ = watched_wait_quiet(monkeypatch, idle, timeout=10.0)
        assert len(readings) == 2 and readings[1] - readings[0] < QUIET  # one step, quiet: done at once
        for _ in range(5):
            readings, waited = watched_wait_quiet(monkeypatch, busy, timeout=0.6)
            steps = [b - a for a, b in itertools.pairwise(readings)]
            assert steps and all(step >= QUIET for step in steps[:-1])  # it stopped at the first quiet step
            if steps[-1] >= QUIET:
                break  # no step was quiet
        else:
            pytest.fail(f"the busy process was starved to quiet in every try: {steps}")
        assert waited >= 0.6  # so it waited the timeout out
    finally:
        for proc in (idle, busy):
            proc.kill()
            proc.wait()
            proc.stdout.close()


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
