"""Overload: the editor workload at 1× and at N× the users, same server, one after the other.

    python loadtests/overload.py --host http://127.0.0.1:8000 --users 8 --factor 5 --run-time 60 --out /tmp/ol

The 1× run is the peer: the latency the server gives the editor load it carries. At N× the
server must refuse what it cannot carry (429/503 with Retry-After) and keep the latency of what
it admits. Prints, per run: inline requests sent, admitted, refused, anything else, and the
admitted requests' p50/p80/p99 (streamed ones to their last token); exits 0 when at N× every
request was admitted or refused with Retry-After and the admitted p80 is within the latency
objective — --slo-ms when given (e.g. the engine's max_predicted_latency_s), else --tolerance
times the 1× p80; 1 when not; 2 when a run could not happen. Writes summary.json and each run's
requests.csv (loadtests/locustfile.py's raw log) under --out.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import chaos  # noqa: E402
import run_slo  # noqa: E402
import workloads as wl  # noqa: E402


def measure(rows: list[dict], timeout_s: float) -> dict:
    inline = [r for r in rows if r["name"] in wl.INLINE and r["status"] != "open"]
    kinds = [chaos.outcome(r, timeout_s) for r in inline]
    admitted = sorted(r["ms"] for r, k in zip(inline, kinds) if k == "ok")
    return {"sent": len(inline), "admitted": len(admitted), "refused": kinds.count("refused"),
            "other": sum(k not in ("ok", "refused") for k in kinds),
            **{f"p{int(q * 100)}": wl.nearest_rank(admitted, q) for q in (0.5, 0.8, 0.99)}}


def run(host: str, users: int, run_time_s: int, out: Path, workload: wl.WorkloadConfig) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    args = argparse.Namespace(host=host, users=users, spawn_rate=max(2.0, users / 2), run_time=f"{run_time_s}s",
                              out=out)
    code = run_slo.run_locust(args, workload)
    raw = out / "requests.csv"
    if code not in (0, 1) or not raw.is_file():
        raise RuntimeError(f"locust exited with {code} and wrote no {raw}")
    return measure(chaos.read_requests(raw), workload.timeout_s)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", required=True)
    p.add_argument("--users", type=int, default=8, help="the 1× load")
    p.add_argument("--factor", type=int, default=5)
    p.add_argument("--run-time", type=int, default=60, help="seconds per run")
    p.add_argument("--tolerance", type=float, default=1.25, help="admitted p80 at N× ≤ this × p80 at 1×")
    p.add_argument("--slo-ms", type=float, default=None, help="admitted p80 at N× ≤ this (overrides --tolerance)")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    workload = wl.WorkloadConfig.from_env()
    try:
        base = run(args.host, args.users, args.run_time, args.out / "1x", workload)
        over = run(args.host, args.users * args.factor, args.run_time, args.out / f"{args.factor}x", workload)
    except RuntimeError as exc:
        print(f"overload: {exc}", file=sys.stderr)
        return 2
    objective = args.slo_ms if args.slo_ms is not None else args.tolerance * base["p80"]
    ok = over["other"] == 0 and over["p80"] <= objective
    (args.out / "summary.json").write_text(json.dumps({"1x": base, f"{args.factor}x": over, "users": args.users,
                                                       "objective_ms": objective, "ok": ok}, indent=2))
    print(f"{'run':<6}{'users':>6}{'sent':>7}{'admitted':>9}{'refused':>8}{'other':>6}{'p50 ms':>8}{'p80 ms':>8}"
          f"{'p99 ms':>8}")
    for label, users, m in (("1x", args.users, base), (f"{args.factor}x", args.users * args.factor, over)):
        print(f"{label:<6}{users:>6}{m['sent']:>7}{m['admitted']:>9}{m['refused']:>8}{m['other']:>6}"
              f"{m['p50']:>8.0f}{m['p80']:>8.0f}{m['p99']:>8.0f}")
    print(f"overload: admitted p80 {over['p80']:.0f} ms = {over['p80'] / base['p80']:.2f}× the 1× p80; objective "
          f"{objective:.0f} ms: " + ("kept" if ok else "NOT kept"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
