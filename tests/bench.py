"""`python -m tests.bench`: the gateway next to a direct call, a bare Tornado passthrough and (--vs litellm) LiteLLM.

Starts a fast fake OpenAI (tests/bench_upstream.py), the arms, and a load generator, all on 127.0.0.1.
The measured server is pinned to core 0, the load generator and the fake to core 1; arms are interleaved
(direct, passthrough, gateway, [litellm], direct again; the middle ones reversed every other round) for
--rounds rounds and medians are printed as one table with ratios. Scenarios: 1 chat JSON at c=1/c=32, and at
c=32 once more with the proxies loaded at the same time on one core ("side by side"); 2 chat streams of
50 events at c=1/c=32; 3 many streams held open (1,000 x 20 s; --quick: 200 x 5 s); 4 /similarity;
5 --processes 2 vs 1.
"""
from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import os
import shutil
import signal
import sys
import tempfile
import time
import urllib.request

from . import bench_client as load
from .bench_procs import (
    LITELLM_KEY,
    ROOT,
    Gateway,
    cpu_seconds,
    free_port,
    peak_rss_mb,
    reset_peak_rss,
    spawn,
    stop_all,
    tokens,
    wait_http,
    wait_quiet,
)
from .bench_report import render_table, summarise_cases, targets

PATHS = {"direct": "/v1/chat/completions", "passthrough": "/v1/chat/completions", "litellm": "/v1/chat/completions"}
CHAT = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hello"}],"max_tokens":16}'
STREAM = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hello"}],"max_tokens":64,"stream":true}'
METRICS = ("rps", "p50", "p99", "ttfb_p50", "ttfb_p99", "rss", "max_gap", "cpu_ms")


def round_order(arms: list[str], round_no: int) -> list[str]:
    """The arms of one round: the proxies in turn, in reverse order every other round (so that a machine
    slowing down or speeding up during a round favours none of them), between two direct runs."""
    middle = [arm for arm in arms if arm != "direct"]
    if round_no % 2:
        middle.reverse()
    return ["direct", *middle, "direct#again"] if "direct" in arms else middle


class Server:
    """What an arm needs: a port, a process to watch (None for direct), and the gateway for its ledger."""

    def __init__(self, port: int, proc=None, gateway: Gateway | None = None, path: str = PATHS["direct"]):
        self.port, self.proc, self.gateway, self.path = port, proc, gateway, path


class Bench:
    def __init__(self, args):
        self.args = args
        self.gateways: list[Gateway] = []  # to drop their Postgres schemas at the end
        self.work = tempfile.mkdtemp(prefix="aipipe-bench-")
        two = (os.cpu_count() or 1) >= 2
        self.server_cpus, self.load_cpus, self.all_cpus = ("0", "1", "0,1") if two else (None, None, None)
        if two:
            os.sched_setaffinity(0, {1})  # wrk and the asyncio client inherit core 1
        self.tokens = tokens()
        self.fake_port = free_port()
        log = os.path.join(self.work, "upstream.log")
        proc = spawn([sys.executable, "-m", "tests.bench_upstream", "--port", str(self.fake_port)], log, self.load_cpus)
        wait_http(self.fake_port, "/", proc, 20, log)
        self.servers: dict[str, Server] = {"direct": Server(self.fake_port)}
        self.samples: dict[tuple[str, str], list[dict]] = {}
        self.notes: list[str] = []

    # -- arms ------------------------------------------------------------------------------------
    def start_arms(self, arms: list[str]) -> None:
        upstream = f"http://127.0.0.1:{self.fake_port}"
        if "passthrough" in arms:
            port, log = free_port(), os.path.join(self.work, "passthrough.log")
            proc = spawn([sys.executable, "-m", "tests.bench_passthrough", "--port", str(port), "--upstream", upstream],
                         log, self.server_cpus)
            wait_http(port, "/", proc, 20, log)
            self.servers["passthrough"] = Server(port, proc)
        if "gateway" in arms:
            self.servers["gateway"] = self._gateway("gateway", self.server_cpus, 1)
        if "gateway-alt" in arms:
            gw = Gateway(self.work, self.fake_port, self.server_cpus, 1, "gateway-alt", self.args.alt_tree)
            self.servers["gateway-alt"] = Server(gw.port, gw.proc, gw, "/openai/v1/chat/completions")
        if "litellm" in arms:
            from .bench_litellm import LiteLLM
            lite = LiteLLM(self.work, self.fake_port, self.server_cpus)
            self.servers["litellm"] = Server(lite.port, lite.proc, path=PATHS["litellm"])

    def _gateway(self, name: str, cpus, processes: int, admission: str = "auto") -> Server:
        gw = Gateway(self.work, self.fake_port, cpus, processes, name, store=self.args.store, admission=admission)
        self.gateways.append(gw)
        return Server(gw.port, gw.proc, gw, "/openai/v1/chat/completions")

    def configure_upstream(self, events: int, interval: float) -> None:
        url = f"http://127.0.0.1:{self.fake_port}/_bench/config?events={events}&interval={interval}"
        urllib.request.urlopen(urllib.request.Request(url, method="POST"), timeout=5).read()

    # -- one measurement ---------------------------------------------------------------------------
    def measure(self, case: str, arm: str, kind: str, concurrency: int, duration: float, path: str | None = None,
                body: bytes | None = None, **kw) -> dict:
        server = self.servers[arm.split("#")[0]]
        toks = [LITELLM_KEY] if arm == "litellm" else self.tokens
        before = self._before(server)
        if kind == "json" and load.have_wrk() and not self.args.asyncio_only:
            r = load.run_wrk(server.port, server.path, CHAT, toks, concurrency, duration, self.work)
        else:
            body = body or (CHAT if kind == "json" else STREAM)
            r = load.run_load(server.port, path or server.path, body, toks, concurrency, duration, **kw)
        return self._record(case, arm, server, r, before)

    def side_by_side(self, arms: list[str], concurrency: int, duration: float) -> None:
        """Chat at `concurrency` against the proxies at the same time, one wrk each, all of them on core 0.

        Each gets a fair share of the same core over the same seconds, so whatever the machine's neighbours
        do falls on all of them alike, and their req/s ratio is that of their CPU cost per call. Runs of one
        arm after another, seconds apart, catch the shared machine in different moods.
        """
        case = f"1 chat c={concurrency} side by side"
        for _ in range(self.args.rounds):
            servers = {arm: self.servers[arm] for arm in arms}
            before = {arm: self._before(server) for arm, server in servers.items()}
            with concurrent.futures.ThreadPoolExecutor(len(arms)) as pool:
                runs = {arm: pool.submit(load.run_wrk, server.port, server.path, CHAT, self.tokens, concurrency,
                                         duration, tempfile.mkdtemp(dir=self.work)) for arm, server in servers.items()}
            for arm, server in servers.items():
                self._record(case, arm, server, runs[arm].result(), before[arm])

    def _before(self, server: Server) -> dict:
        """What a measurement starts from: the gateway's billed rows, the server's CPU time (peak RSS reset)."""
        before = {"billed": server.gateway.settled() if server.gateway else None}
        if server.proc is not None:
            reset_peak_rss(server.proc)
            before["cpu"] = cpu_seconds(server.proc)
        return before

    def _record(self, case: str, arm: str, server: Server, r: dict, before: dict) -> dict:
        """Add peak RSS, CPU per call and (gateways) billing to a load run's result, and keep it as a sample."""
        r["rss"] = peak_rss_mb(server.proc) if server.proc is not None else float("nan")
        # the server's CPU time per answered request: steadier than req/s when the machine is shared
        r["cpu_ms"] = (1000 * (cpu_seconds(server.proc) - before["cpu"]) / r["ok"]
                       if server.proc is not None and r["ok"] else float("nan"))
        if server.proc is not None:
            wait_quiet(server.proc)
        if server.gateway:
            before, after = before["billed"], server.gateway.settled()
            r["billed"], r["billed_cost"] = after[0] - before[0], after[1] - before[1]
            if r["billed"] < r["ok"]:
                self.notes.append(f"{case} {arm}: only {r['billed']} of {r['ok']} answered requests were billed")
        self.samples.setdefault((case, arm.split("#")[0]), []).append(r)
        print(f"  {case:<22} {arm:<12} {r['rps']:8.1f}/s p50 {r['p50']:7.2f} ms p99 {r['p99']:7.2f} ms "
              f"errors {r['errors']} rss {r['rss']:.0f} MB cpu {r['cpu_ms']:.3f} ms/req", file=sys.stderr, flush=True)
        return r

    def warm(self, arms: list[str]) -> None:
        for arm in arms:
            server = self.servers[arm]
            toks = [LITELLM_KEY] if arm == "litellm" else self.tokens
            load.run_load(server.port, server.path, CHAT, toks, 16, 2.0, max_requests=8)

    def interleave(self, case: str, arms: list[str], kind: str, concurrency: int, duration: float, **kw) -> None:
        for round_no in range(self.args.rounds):
            for arm in round_order(arms, round_no):
                self.measure(case, arm, kind, concurrency, duration, **kw)

    # -- scenarios -----------------------------------------------------------------------------------
    def run(self) -> dict:
        a = self.args
        arms = ["direct", "passthrough", "gateway"] + (["gateway-alt"] if a.alt_tree else []) + (
            ["litellm"] if a.vs == "litellm" else [])
        self.start_arms(arms)
        self.warm(arms)
        levels = a.concurrency or [1, 32]
        if "1" in a.scenarios:
            self.configure_upstream(50, 0.0)
            for c in levels:
                self.interleave(f"1 chat c={c}", arms, "json", c, a.duration)
            if max(levels) > 1 and load.have_wrk() and not a.asyncio_only:
                self.side_by_side([arm for arm in arms if arm not in ("direct", "litellm")], max(levels), a.duration)
        if "2" in a.scenarios:
            self.configure_upstream(50, a.event_interval)
            for c in levels:
                self.interleave(f"2 stream50 c={c}", arms, "sse", c, a.duration, expect_events=50)
        if "3" in a.scenarios:
            self.hold_streams([arm for arm in arms if arm != "direct"])
        if "4" in a.scenarios:
            self.similarity()
        if "5" in a.scenarios:
            self.scaling(max(levels))
        cases = summarise_cases(self.samples, METRICS)
        return {"cases": cases, "notes": self.notes, "targets": targets(cases),
                "args": {k: v for k, v in vars(a).items()}, "date": time.strftime("%Y-%m-%d %H:%M %Z")}

    def hold_streams(self, arms: list[str]) -> None:
        """Scenario 3: N streams open at once, an event every 100 ms; stalls, peak RSS, billing."""
        n, seconds = (200, 5.0) if self.args.quick else (self.args.streams, 20.0)
        events = int(seconds / 0.1)
        self.configure_upstream(events, 0.1)
        case = f"3 hold {n} streams"
        for arm in arms:
            self.measure(case, arm, "sse", n, 3.0, expect_events=events, max_requests=1, ramp=2.0)
        self.configure_upstream(50, 0.0)

    def similarity(self) -> None:
        """Scenario 4 hook: /similarity 1,000 x 1,000 once aipipe/handlers/similarity.py exists."""
        if not os.path.exists(os.path.join(ROOT, "aipipe", "handlers", "similarity.py")):
            self.notes.append("4 similarity: skipped, aipipe/handlers/similarity.py does not exist yet")
            return
        n = 100 if self.args.quick else 1000
        docs, topics = [f"document number {i} about bench" for i in range(n)], [f"topic {i}" for i in range(n)]
        embed = json.dumps({"model": "text-embedding-3-small", "input": docs + topics, "encoding_format": "base64"})
        similarity = json.dumps({"docs": docs, "topics": topics})
        self.configure_upstream(50, 0.0)
        case = f"4 similarity {n}x{n}"
        for _ in range(self.args.rounds):
            # direct: the embeddings call alone (what /similarity makes upstream); gateway: the whole /similarity
            self.measure(case, "direct", "similarity", 1, self.args.duration, "/v1/embeddings", embed.encode())
            self.measure(case, "gateway", "similarity", 1, self.args.duration, "/similarity", similarity.encode())

    def scaling(self, concurrency: int) -> None:
        """Scenario 5: `--processes 1` vs `--processes 2`, both free to use both cores."""
        # p1-store: one process admitting through the database, as every process of --processes N does
        arms = ["gateway-p1", "gateway-p1-store", "gateway-p2"]
        self.servers["gateway-p1"] = self._gateway("gateway-p1", self.all_cpus, 1)
        self.servers["gateway-p1-store"] = self._gateway("gateway-p1-store", self.all_cpus, 1, admission="store")
        self.servers["gateway-p2"] = self._gateway("gateway-p2", self.all_cpus, 2)
        self.warm(arms)
        self.configure_upstream(50, 0.0)
        self.interleave(f"5 chat c={concurrency} procs", ["direct"] + arms, "json", concurrency, self.args.duration)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m tests.bench", description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds per case (medians are reported)")
    p.add_argument("--duration", type=float, default=5.0, help="seconds per measurement")
    p.add_argument("--quick", action="store_true", help="1 round of 1 s, 200 streams for 5 s in scenario 3")
    p.add_argument("--scenarios", default="1,2,3,4,5", help="comma-separated subset of 1,2,3,4,5")
    p.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], help="levels (default 1,32)")
    p.add_argument("--vs", choices=["litellm"], help="also run LiteLLM's proxy from PyPI")
    p.add_argument("--streams", type=int, default=1000, help="streams held open in scenario 3")
    p.add_argument("--event-interval", type=float, default=0.0, help="seconds between events in scenario 2")
    p.add_argument("--asyncio-only", action="store_true", help="use the asyncio client even where wrk would do")
    p.add_argument("--alt-tree", metavar="DIR", help="A/B: also run a gateway importing aipipe from DIR (an edited copy)")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder (logs, SQLite files)")
    p.add_argument("--json", metavar="OUT", help="write every sample and the medians here")
    p.add_argument("--store", metavar="URL", help="run the gateway on this postgresql:// database (a fresh schema) "
                                                   "instead of SQLite, e.g. postgresql://postgres@127.0.0.1:5432/test")
    args = p.parse_args(argv)
    args.scenarios = args.scenarios.split(",")
    if args.quick:
        args.rounds, args.duration = 1, 1.0
    args.rounds = max(1, min(args.rounds, 20))
    args.duration = max(0.5, min(args.duration, 120.0))
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the finally below kills the children
    try:
        import uvloop
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass
    bench = Bench(args)
    try:
        result = bench.run()
    except Exception as e:
        if type(e).__name__ == "LiteLLMUnavailable":
            raise SystemExit(f"bench: --vs litellm failed: {e}") from None
        raise
    finally:
        stop_all()
        for gw in bench.gateways:
            gw.drop_schema()
        if not args.keep:
            shutil.rmtree(bench.work, ignore_errors=True)
    print(render_table(result["cases"]))
    for note in result["notes"] + [t["line"] for t in result["targets"]]:
        print(note)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**result, "samples": {f"{c}|{a}": s for (c, a), s in bench.samples.items()}}, f, indent=1, default=str)
    return result


if __name__ == "__main__":
    main()
