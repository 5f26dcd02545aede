"""Run the editor load test against a running server and check the inline-completion SLO.

    python loadtests/run_slo.py --host http://127.0.0.1:8000 --users 8 --run-time 3m --out /tmp/lt

Starts headless Locust on loadtests/locustfile.py for the given users and time, then writes into
--out: Locust's CSVs (`locust_stats.csv`, `locust_stats_history.csv`, `locust_failures.csv`), its
HTML report (`report.html`), `requests.csv` (every request: name, start, ms, ok), `latency.png`
(latency over time and its distribution, against the 50 ms line), `summary.json`, and the
server-side breakdown (`breakdown.md`: where the time went, from the server's /metrics scraped
before and after). It prints a short table last and exits non-zero when the SLO fails:

- p80 of inline completions (every FIM request, streamed ones to their last token) < 50 ms,
- p99 < 150 ms,
- no failed request of any kind.

Percentiles are computed from every request's own time (requests.csv), not from Locust's
per-name aggregates, so the inline requests of all kinds are ranked together. `--failures-only`
keeps just the last condition: the CI smoke runs on machines whose speed nobody controls.
Exit codes: 0 SLO met, 1 SLO failed, 2 the test could not run (server down, Locust error).
A server with API keys: set MOE_LT_API_KEY.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import random
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, fields
from pathlib import Path

from serve_app.cli import wait_healthy

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import breakdown  # noqa: E402
import workloads as wl  # noqa: E402



def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", required=True, help="server base URL, e.g. http://127.0.0.1:8000")
    p.add_argument("--users", type=int, default=8, help="concurrent simulated users")
    p.add_argument("--spawn-rate", type=float, default=2.0, help="users started per second")
    p.add_argument("--run-time", default="60s", help="Locust duration (30s, 3m, ...)")
    p.add_argument("--out", type=Path, required=True, help="directory for CSV, HTML, PNG, summary")
    p.add_argument("--label", default="", help="title of the plot and the summary (e.g. 'ray, 2 shards')")
    p.add_argument("--p80-ms", type=float, default=50.0, help="SLO: p80 of inline completions below this")
    p.add_argument("--p99-ms", type=float, default=150.0, help="SLO: p99 of inline completions below this")
    p.add_argument("--failures-only", action="store_true", help="check only that nothing failed")
    p.add_argument("--metrics-settle-s", type=float, default=0.0,
                   help="wait before the last /metrics scrape (Ray flushes metrics every few seconds)")
    p.add_argument("--health-timeout-s", type=float, default=120.0)
    p.add_argument("--warmup-requests", type=int, default=3,
                   help="FIM requests sent (and not measured) before the run: first forwards are slow")
    for f in fields(wl.WorkloadConfig):
        default = f.default
        p.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=default,
                       help=f"workload: {f.name} (default {default!r})")
    return p.parse_args(argv)


def warm_up(url: str, count: int, workload: wl.WorkloadConfig) -> None:
    rng, pool = random.Random(0), wl.SourcePool()
    for _ in range(count):
        cut = wl.fim_cut(pool.text(rng), rng, workload)
        body = json.dumps({"prefix": cut.prefix, "suffix": cut.suffix, "max_tokens": workload.max_tokens,
                           "temperature": workload.temperature}).encode()
        req = urllib.request.Request(f"{url}/v1/fim/completions", data=body,
                                     headers={"Content-Type": "application/json", **auth_headers()})
        with urllib.request.urlopen(req, timeout=120) as resp:
            resp.read()


def auth_headers() -> dict[str, str]:
    key = os.environ.get("MOE_LT_API_KEY", "")
    return {"Authorization": f"Bearer {key}"} if key else {}


def try_scrape(url: str) -> breakdown.Samples | None:
    try:
        return breakdown.scrape(url, auth_headers())
    except (OSError, ValueError) as exc:
        print(f"run_slo: no server metrics from {url}/metrics ({exc}); breakdown skipped", file=sys.stderr)
        return None


def run_locust(args: argparse.Namespace, workload: wl.WorkloadConfig) -> int:
    cmd = [sys.executable, "-m", "locust", "-f", str(HERE / "locustfile.py"), "--headless",
           "--host", args.host, "-u", str(args.users), "-r", str(args.spawn_rate), "-t", args.run_time,
           "--csv", str(args.out / "locust"), "--html", str(args.out / "report.html"),
           "--stop-timeout", "30", "--only-summary", "--loglevel", "WARNING"]
    env = {**os.environ, **workload.to_env(), "MOE_LT_RAW_CSV": str(args.out / "requests.csv")}
    # Locust exits 1 when any request failed; that is judged below from requests.csv.
    return subprocess.run(cmd, env=env, cwd=HERE).returncode


def read_requests(path: Path) -> list[dict]:
    with path.open() as f:
        return [{"name": r["name"], "start": float(r["start_s"]), "ms": float(r["ms"]), "ok": r["ok"] == "1",
                 "status": r["status"], "error": r["error"], "keystroke": _int(r.get("keystroke")),
                 "prompt_tokens": _int(r.get("prompt_tokens")), "cached_tokens": _int(r.get("cached_tokens"))}
                for r in csv.DictReader(f)]


def _int(value: str | None) -> int | None:
    return int(value) if value not in (None, "") else None


def cached_shares(requests: list[dict]) -> dict:
    """The prefix cache's share of prompt tokens as the answers' usage reports it: over every request,
    and over the keystrokes after each session's first (the first of a hole fills the cache)."""
    def share(rows):
        rows = [r for r in rows if r["prompt_tokens"]]
        total = sum(r["prompt_tokens"] for r in rows)
        return {"requests": len(rows), "share": sum(r["cached_tokens"] or 0 for r in rows) / total if total else None}
    return {"all": share(requests), "after_first": share([r for r in requests if (r["keystroke"] or 0) > 0])}


def without_stop_cuts(requests: list[dict]) -> tuple[list[dict], int]:
    """The requests minus those Locust cut when it stopped (no latency sample, no failure) — unless
    one had waited longer than every answered request when it was cut: that one was stuck, and
    stays a failure."""
    answered = max((r["ms"] for r in requests if r["status"] != "open"), default=0.0)
    kept = [r for r in requests if not (r["status"] == "open" and r["error"].startswith("cut by Locust")
                                        and r["ms"] <= answered)]
    return kept, len(requests) - len(kept)


def summarize(requests: list[dict]) -> dict:
    groups = {"inline (all FIM)": [r for r in requests if r["name"] in wl.INLINE]}
    for name in sorted({r["name"] for r in requests}):
        groups[name] = [r for r in requests if r["name"] == name]
    span = (max(r["start"] for r in requests) - min(r["start"] for r in requests)) if requests else 0.0
    out = {}
    for name, rows in groups.items():
        ms = sorted(r["ms"] for r in rows)
        out[name] = {"count": len(rows), "failures": sum(not r["ok"] for r in rows),
                     "rps": len(rows) / span if span else math.nan,
                     **{f"p{int(q * 100)}": wl.nearest_rank(ms, q) for q in (0.5, 0.8, 0.95, 0.99)},
                     "max": ms[-1] if ms else math.nan}
    return out


def verdict(stats: dict, requests: list[dict], args: argparse.Namespace) -> list[str]:
    """The SLO's broken conditions (empty = met)."""
    broken = []
    failures = sum(not r["ok"] for r in requests)
    if failures:
        broken.append(f"{failures} failed requests")
    inline = stats.get("inline (all FIM)", {"count": 0})
    if not inline["count"]:
        broken.append("no inline completion finished")
    elif not args.failures_only:
        if not inline["p80"] < args.p80_ms:
            broken.append(f"inline p80 {inline['p80']:.1f} ms >= {args.p80_ms:g} ms")
        if not inline["p99"] < args.p99_ms:
            broken.append(f"inline p99 {inline['p99']:.1f} ms >= {args.p99_ms:g} ms")
    return broken


def plot(requests: list[dict], args: argparse.Namespace, path: Path, inline: dict | None = None) -> bool:
    try:
        import matplotlib
    except ImportError:
        print("run_slo: matplotlib is not installed (pip install -e '.[test]'); no plot", file=sys.stderr)
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t0 = min(r["start"] for r in requests)
    fig, (ax_time, ax_cdf) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [3, 2]})
    kinds = [("inline", lambda r: r["name"] in wl.INLINE, "tab:blue"),
             ("TTFT fim-stream", lambda r: r["name"] == wl.TTFT_FIM_STREAM, "tab:green"),
             ("chat", lambda r: r["name"] == wl.CHAT, "tab:orange")]
    for label, keep, color in kinds:
        rows = [r for r in requests if keep(r) and r["ok"]]
        if not rows:
            continue
        ax_time.scatter([r["start"] - t0 for r in rows], [r["ms"] for r in rows], s=4, alpha=0.5,
                        color=color, label=label)
        ms = sorted(r["ms"] for r in rows)
        ax_cdf.plot(ms, [(i + 1) / len(ms) for i in range(len(ms))], color=color, label=label)
    ax_time.set_yscale("log")
    ax_cdf.set_xscale("log")
    ax_time.axhline(args.p80_ms, color="red", linestyle="--", label=f"{args.p80_ms:g} ms target")
    ax_time.set_xlabel("seconds into the run")
    ax_time.set_ylabel("latency, ms (log)")
    ax_time.legend(loc="upper right", fontsize=8, markerscale=3)
    ax_cdf.axvline(args.p80_ms, color="red", linestyle="--")
    ax_cdf.axhline(0.8, color="grey", linestyle=":")
    ax_cdf.set_xlabel("latency, ms (log)")
    ax_cdf.set_ylabel("fraction of requests")
    title = f"{args.label + ': ' if args.label else ''}{args.users} users, {args.run_time}"
    if inline and inline["count"]:
        title += f"; inline p50/p80/p99 {inline['p50']:.0f}/{inline['p80']:.0f}/{inline['p99']:.0f} ms"
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def table(stats: dict) -> str:
    lines = [f"| {'requests':<22} | {'n':>6} | {'fail':>4} | {'req/s':>6} | {'p50 ms':>7} | {'p80 ms':>7} | "
             f"{'p99 ms':>7} | {'max ms':>7} |", "|" + "|".join("-" * w for w in (24, 8, 6, 8, 9, 9, 9, 9)) + "|"]
    for name, s in stats.items():
        lines.append(f"| {name:<22} | {s['count']:>6} | {s['failures']:>4} | {s['rps']:>6.2f} | {s['p50']:>7.1f} | "
                     f"{s['p80']:>7.1f} | {s['p99']:>7.1f} | {s['max']:>7.1f} |")
    return "\n".join(lines)


def git_commit() -> str:
    """The tree the numbers belong to ("" outside a git checkout; "+dirty" with local changes)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=HERE,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""
    return f"{head}+dirty" if head and dirty else head


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.host = args.host.rstrip("/")
    args.out.mkdir(parents=True, exist_ok=True)
    workload = wl.WorkloadConfig(**{f.name: getattr(args, f.name) for f in fields(wl.WorkloadConfig)})
    try:
        wait_healthy(args.host, args.health_timeout_s)
        warm_up(args.host, args.warmup_requests, workload)
    except (TimeoutError, OSError) as exc:
        print(f"run_slo: server not usable: {exc}", file=sys.stderr)
        return 2
    before, load_before, started = try_scrape(args.host), os.getloadavg(), time.time()
    code = run_locust(args, workload)
    raw = args.out / "requests.csv"
    if code not in (0, 1) or not raw.is_file():
        print(f"run_slo: locust exited with {code} and wrote no {raw.name}", file=sys.stderr)
        return 2
    time.sleep(args.metrics_settle_s)
    after = try_scrape(args.host) if before is not None else None
    requests, cut = without_stop_cuts(read_requests(raw))
    if cut:
        print(f"{cut} request(s) cut by Locust stopping, younger than the slowest answer: not counted")
    stats = summarize(requests)
    cached = cached_shares(requests)
    rows = breakdown.breakdown(before, after) if after is not None else []
    if rows:
        (args.out / "breakdown.md").write_text(breakdown.format_rows(rows) + "\n")
    plotted = bool(requests) and plot(requests, args, args.out / "latency.png", stats.get("inline (all FIM)"))
    broken = verdict(stats, requests, args)
    summary = {"label": args.label, "host": args.host, "users": args.users, "run_time": args.run_time,
               "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(started)),
               "commit": git_commit(), "cpus": os.cpu_count(), "cut_by_locust_stopping": cut, "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
               "workload": asdict(workload), "slo": {"p80_ms": args.p80_ms, "p99_ms": args.p99_ms,
                                                      "failures_only": args.failures_only},
               "stats": stats, "cached_share": cached, "server_breakdown": rows, "plot": plotted, "slo_met": not broken,
               "broken": broken}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    if rows:
        print(f"\nserver side ({args.host}/metrics, during the run):\n{breakdown.format_rows(rows)}")
    print(f"\n{args.label or args.host}: {args.users} users, {args.run_time}, load average "
          f"{load_before[0]:.1f} → {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs\n{table(stats)}")
    if cached["all"]["share"] is not None and cached["after_first"]["share"] is not None:
        print(f"prompt tokens from the prefix cache (answers' usage): {cached['all']['share']:.1%} of all, "
              f"{cached['after_first']['share']:.1%} after each session's first request")
    print("SLO met" if not broken else "SLO FAILED: " + "; ".join(broken))
    return 0 if not broken else 1


if __name__ == "__main__":
    sys.exit(main())
