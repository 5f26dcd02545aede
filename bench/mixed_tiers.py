"""Mixed-tier traffic: does a simple completion's latency depend on complex requests in flight?

Against a running server (`moe-serve`), two phases of the same simple load, measured back to back:
  A. simple only: `users` closed-loop clients sending short mid-line FIM completions (the classifier
     sends them to the INT4 fast lane);
  B. the same simple load plus `complex_users` clients sending full-precision, long completions
     (expert parallelism through the shards).
Prints p50/p80/p99 of the simple requests in each phase and the ratio of the p80s (target: B's p80
within 20% of A's). Both phases run in this one process against the same server.

    python -m bench.mixed_tiers --url http://127.0.0.1:8000 [--seconds 30] [--users 4] [--complex-users 2]
"""
from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time

import httpx

SIMPLE = [("def area(r):\n    return 3.14 * r", "\n"), ("for item in items:\n    total += item.pri", "\n"),
          ("import os\npath = os.path.jo", "\n"), ("class A:\n    def __init__(self, x):\n        self.x", "\n")]
COMPLEX = "import json\n\n\ndef load_settings(path, defaults=None):\n"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def simple_user(client: httpx.AsyncClient, url: str, stop_at: float, rng: random.Random,
                      out: list[float], failures: list[int]) -> None:
    while time.monotonic() < stop_at:
        prefix, suffix = rng.choice(SIMPLE)
        started = time.perf_counter()
        r = await client.post(f"{url}/v1/fim/completions", json={"prefix": prefix, "suffix": suffix,
                                                                 "max_tokens": 16, "temperature": 0})
        if r.status_code == 200 and r.json().get("tier") == "simple":
            out.append(time.perf_counter() - started)
        else:
            failures.append(r.status_code)


async def complex_user(client: httpx.AsyncClient, url: str, stop_at: float, done: list[tuple[int, float]]) -> None:
    while time.monotonic() < stop_at:
        started = time.perf_counter()
        r = await client.post(f"{url}/v1/completions", json={"prompt": COMPLEX, "max_tokens": 128,
                                                             "precision": "full", "temperature": 0.4})
        done.append((r.status_code, time.perf_counter() - started))


async def phase(url: str, seconds: float, users: int, complex_users: int, seed: int) -> dict:
    latencies, failures, complex_done = [], [], []
    stop_at = time.monotonic() + seconds
    async with httpx.AsyncClient(timeout=120) as client:
        tasks = [simple_user(client, url, stop_at, random.Random(seed + i), latencies, failures) for i in range(users)]
        tasks += [complex_user(client, url, stop_at, complex_done) for _ in range(complex_users)]
        await asyncio.gather(*tasks)
    ok = [t for status, t in complex_done if status == 200]
    return {"n": len(latencies), "failures": len(failures), "complex": len(complex_done),
            "complex_ok": len(ok), "complex_p50": statistics.median(ok) if ok else float("nan"),
            "p50": statistics.median(latencies) if latencies else float("nan"),
            "p80": percentile(latencies, 0.8) if latencies else float("nan"),
            "p99": percentile(latencies, 0.99) if latencies else float("nan")}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", required=True)
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--users", type=int, default=4)
    ap.add_argument("--complex-users", type=int, default=2)
    args = ap.parse_args(argv)
    asyncio.run(phase(args.url, 5, args.users, 0, 99))              # warm-up: caches, lanes, shards
    a = asyncio.run(phase(args.url, args.seconds, args.users, 0, 0))
    b = asyncio.run(phase(args.url, args.seconds, args.users, args.complex_users, 0))
    print(f"{'phase':<28} {'simple n':>8} {'p50 ms':>7} {'p80 ms':>7} {'p99 ms':>7} {'fail':>5} "
          f"{'complex done/ok':>15} {'complex p50 s':>13}")
    for name, r in (("A simple only", a), (f"B + {args.complex_users} complex users", b)):
        print(f"{name:<28} {r['n']:>8} {r['p50'] * 1e3:>7.1f} {r['p80'] * 1e3:>7.1f} {r['p99'] * 1e3:>7.1f} "
              f"{r['failures']:>5} {r['complex']:>8}/{r['complex_ok']:<6} {r['complex_p50']:>13.1f}")
    print(f"p80 ratio B/A: {b['p80'] / a['p80']:.2f} (target <= 1.20)")


if __name__ == "__main__":
    main()
