"""The benchmark's one table: medians per case and arm, ratios to the other arms, and the issue's targets."""
from __future__ import annotations

import math
import statistics

SUMMED = ("ok", "errors", "stalled", "billed")


def median(values: list[float]) -> float:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.median(values) if values else float("nan")


def summarise_cases(samples: dict[tuple[str, str], list[dict]], metrics: tuple[str, ...]) -> list[dict]:
    """One row per (case, arm): medians of metrics, sums of counts, and ratios within the case."""
    rows = []
    for (case, arm), runs in samples.items():
        row = {"case": case, "arm": arm, "runs": len(runs)}
        row.update({m: median([r.get(m, float("nan")) for r in runs]) for m in metrics})
        row.update({k: sum(r.get(k, 0) for r in runs) for k in SUMMED if any(k in r for r in runs)})
        rows.append(row)
    for row in rows:
        case, stream = row["case"], "stream" in row["case"] or "hold" in row["case"]
        mine = samples[(case, row["arm"])]
        base = {arm: samples.get((case, arm)) for arm in ("direct", "passthrough", "litellm", "gateway-p1")}
        row["x_passthrough"] = paired_ratio(mine, base["passthrough"] or base["gateway-p1"])
        row["x_litellm"] = paired_ratio(mine, base["litellm"])
        key = "ttfb_p50" if stream else "p50"
        row["added_ms"] = added(mine, base["direct"], key) if row["arm"] != "direct" else float("nan")
    return rows


def paired_ratio(mine: list[dict], base: list[dict] | None) -> float:
    """Median over rounds of my req/s over base's in the same round (arms run back to back, so drift cancels)."""
    if not base or base is mine or len(base) != len(mine):
        return float("nan")
    return median([m["rps"] / b["rps"] for m, b in zip(mine, base) if b["rps"]])


def added(mine: list[dict], direct: list[dict] | None, key: str) -> float:
    """Median over rounds of my latency minus the mean of that round's two direct runs (before and after)."""
    if not direct:
        return float("nan")
    per_round = len(direct) // len(mine) if len(direct) >= len(mine) else 0
    if not per_round:
        return float("nan")
    return median([m[key] - statistics.fmean(d[key] for d in direct[i * per_round:(i + 1) * per_round])
                   for i, m in enumerate(mine)])


def fmt(value, spec: str = ".1f") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)


def render_table(rows: list[dict]) -> str:
    """A Markdown table (readable in a terminal too)."""
    head = ["case", "arm", "req/s", "p50 ms", "p99 ms", "TTFB p50 ms", "errors", "peak RSS MB",
            "CPU ms/req", "x passthrough", "x litellm", "added ms", "billed/ok"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        billed = f"{r['billed']}/{r['ok']}" if "billed" in r else "-"
        errors = str(r.get("errors", 0)) + (f" ({r['stalled']} stalled)" if r.get("stalled") else "")
        stream = "stream" in r["case"] or "hold" in r["case"]
        cells = [r["case"], r["arm"], fmt(r["rps"]), fmt(r["p50"], ".2f"), fmt(r["p99"], ".2f"),
                 fmt(r["ttfb_p50"], ".2f") if stream else "-", errors, fmt(r["rss"], ".0f"),
                 fmt(r.get("cpu_ms"), ".3f"), fmt(r["x_passthrough"], ".2f"), fmt(r["x_litellm"], ".1f"), fmt(r["added_ms"], "+.2f"), billed]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _find(rows: list[dict], case: str, arm: str) -> dict | None:
    return next((r for r in rows if r["case"] == case and r["arm"] == arm), None)


def targets(rows: list[dict]) -> list[dict]:
    """The issue's targets, each with what was measured and whether it was met."""
    out = []

    def check(name: str, value: float, ok: bool, shown: str) -> None:
        out.append({"target": name, "value": value, "met": ok,
                    "line": f"target: {name}: {shown} -> {'MET' if ok else 'MISSED'}"})

    g32 = _find(rows, "1 chat c=32", "gateway")
    if g32 and not math.isnan(g32["x_litellm"]):
        check(">= 20x LiteLLM req/s at c=32", g32["x_litellm"], g32["x_litellm"] >= 20, f"{g32['x_litellm']:.1f}x")
    if g32 and not math.isnan(g32["x_passthrough"]):
        check(">= 80% of passthrough req/s at c=32", g32["x_passthrough"], g32["x_passthrough"] >= 0.8,
              f"{g32['x_passthrough']:.0%}")
    side = _find(rows, "1 chat c=32 side by side", "gateway")
    if side and not math.isnan(side["x_passthrough"]):
        check(">= 80% of passthrough req/s at c=32, side by side on one core", side["x_passthrough"],
              side["x_passthrough"] >= 0.8, f"{side['x_passthrough']:.0%}")
    g1 = _find(rows, "1 chat c=1", "gateway")
    if g1 and not math.isnan(g1["added_ms"]):
        check("added p50 latency at c=1 < 1 ms", g1["added_ms"], g1["added_ms"] < 1, f"{g1['added_ms']:+.2f} ms")
    s1 = _find(rows, "2 stream50 c=1", "gateway")
    if s1 and not math.isnan(s1["added_ms"]):
        check("added TTFB at c=1 < 1 ms", s1["added_ms"], s1["added_ms"] < 1, f"{s1['added_ms']:+.2f} ms")
    hold = next((r for r in rows if r["case"].startswith("3 hold") and r["arm"] == "gateway"), None)
    if hold:
        check(f"{hold['case']}: peak RSS < 150 MB", hold["rss"], hold["rss"] < 150, f"{hold['rss']:.0f} MB")
        check(f"{hold['case']}: none stalled or failed", hold["errors"], hold["errors"] == 0 and not hold.get("stalled"),
              f"{hold['errors']} failed/stalled, longest gap {hold['max_gap']:.0f} ms")
        check(f"{hold['case']}: every one billed", hold.get("billed", 0), hold.get("billed", 0) >= hold["ok"],
              f"{hold.get('billed', 0)} billed of {hold['ok']}")
    p1 = next((r for r in rows if r["case"].startswith("5") and r["arm"] == "gateway-p1"), None)
    p2 = next((r for r in rows if r["case"].startswith("5") and r["arm"] == "gateway-p2"), None)
    if p1 and p2 and not math.isnan(p2["x_passthrough"]):  # for case 5 that column is p2 over p1, round by round
        check("--processes 2 uses more cores (req/s p2/p1 > 1.05)", p2["x_passthrough"], p2["x_passthrough"] > 1.05,
              f"{p2['x_passthrough']:.2f}x")
    return out
