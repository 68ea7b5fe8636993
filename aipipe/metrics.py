"""Prometheus metrics for GET /metrics, through prometheus-client.

One `Metrics` per server process. With `--processes N` the workers write their values to files in a shared
folder (prometheus-client's multiprocess mode, switched on by PROMETHEUS_MULTIPROC_DIR before the library is
first imported: see `use_multiprocess_folder`), and one scrape of any worker adds up all of them.

Labels carry provider names, route classes, statuses, token kinds and refusal reasons only: never an email,
a token, a key or a model name a caller typed (which could be anything).

A call's counts and timings go into plain dictionaries first (a dictionary update each, where going
through prometheus-client's locked values cost several times a proxied call's other bookkeeping) and are
added to the library's metrics in bulk: at every scrape of this process, and once a second in
multiprocess mode so that a scrape answered by another worker is at most that old.
"""
from __future__ import annotations

import bisect
import os
import shutil

PREFIX = "aipipe"
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
INF = float("inf")
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300)


def use_multiprocess_folder(folder: str) -> None:
    """Before forking workers (and before prometheus_client is imported): values go to files in folder."""
    shutil.rmtree(folder, ignore_errors=True)  # values of an earlier run would be added to this one's
    os.makedirs(folder, mode=0o700, exist_ok=True)
    os.environ[MULTIPROC_ENV] = folder


def worker_exited(pid: int) -> None:
    """Forget a dead worker's live gauges (open streams)."""
    if os.environ.get(MULTIPROC_ENV):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)


class Metrics:
    """The gateway's counters, gauges and histograms, and their text for a scrape."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
        from prometheus_client import PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR

        self.multiprocess = bool(os.environ.get(MULTIPROC_ENV))
        # in multiprocess mode metrics live in the files, and a scrape reads them with a fresh registry
        self.registry = None if self.multiprocess else CollectorRegistry(auto_describe=True)
        reg = self.registry
        if reg is not None:
            for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
                reg.register(collector)
        self.requests = Counter(f"{PREFIX}_requests", "Requests answered, by provider, route class and status",
                                ("provider", "route", "status"), registry=reg)
        self.upstream_seconds = Histogram(f"{PREFIX}_upstream_seconds", "Provider calls: time until the answer ended",
                                          ("provider",), buckets=LATENCY_BUCKETS, registry=reg)
        self.upstream_ttfb = Histogram(f"{PREFIX}_upstream_ttfb_seconds", "Provider calls: time to the answer's headers",
                                       ("provider",), buckets=LATENCY_BUCKETS, registry=reg)
        self.open_streams = Gauge(f"{PREFIX}_open_streams", "Event streams being relayed now", ("provider",),
                                  multiprocess_mode="livesum", registry=reg)
        self.cost = Counter(f"{PREFIX}_cost_usd", "USD charged to users, by provider", ("provider",), registry=reg)
        self.tokens = Counter(f"{PREFIX}_tokens", "Tokens billed, by provider and kind", ("provider", "kind"),
                              registry=reg)
        self.refusals = Counter(f"{PREFIX}_refusals", "Calls refused before going upstream: budget, concurrency, rate",
                                ("reason",), registry=reg)
        self.store_errors = Counter(f"{PREFIX}_store_errors", "Failed writes or reads of the usage store", registry=reg)
        self.spooled = Counter(f"{PREFIX}_spooled_charges", "Charges written to the spool because the store was down",
                               registry=reg)
        self._children: dict = {}
        self._added: dict[tuple, float] = {}  # (metric, labels) -> amount not yet added to it
        self._timed: dict[tuple, list] = {}  # (histogram, labels) -> [count per bucket, sum] not yet observed

    def child(self, metric, *labels: str):
        """metric.labels(*labels), looked up once."""
        key = (id(metric), labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found

    def add(self, metric, labels: tuple, amount: float = 1) -> None:
        """Add amount to a counter or gauge (negative for a gauge going down), at the next flush."""
        key = (metric, labels)
        added = self._added
        added[key] = added.get(key, 0) + amount

    def observe(self, histogram, labels: tuple, value: float) -> None:
        """Observe value in a histogram, at the next flush."""
        key = (histogram, labels)
        found = self._timed.get(key)
        if found is None:
            found = self._timed[key] = [[0] * (len(LATENCY_BUCKETS) + 1), 0.0]
        found[0][bisect.bisect_left(LATENCY_BUCKETS, value)] += 1  # bucket i: value <= LATENCY_BUCKETS[i]
        found[1] += value

    def flush(self) -> None:
        """Add what was gathered since the last flush to prometheus-client's metrics."""
        added, self._added = self._added, {}
        for (metric, labels), amount in added.items():
            child = self.child(metric, *map(str, labels))  # made even when the sum is 0: a gauge back at 0 still shows
            if amount:
                child.inc(amount)
        timed, self._timed = self._timed, {}
        for (histogram, labels), (counts, total) in timed.items():
            child = self.child(histogram, *labels)
            # prometheus-client keeps a histogram as one value per bucket (not cumulative) and a sum
            for bucket, n in zip(child._buckets, counts):
                if n:
                    bucket.inc(n)
            child._sum.inc(total)

    def request_done(self, provider: str, route: str, status: int) -> None:
        """Count one answered request (the status becomes text at the flush)."""
        self.add(self.requests, (provider, route, status))

    def charged(self, provider: str, cost: float, input_tokens: int, output_tokens: int) -> None:
        """Count a billed call's cost and tokens."""
        if 0 < cost < INF:
            self.add(self.cost, (provider,), cost)
        if input_tokens > 0:
            self.add(self.tokens, (provider, "input"), input_tokens)
        if output_tokens > 0:
            self.add(self.tokens, (provider, "output"), output_tokens)

    def scrape(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

        self.flush()
        registry = self.registry
        if registry is None:
            from prometheus_client import multiprocess

            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
