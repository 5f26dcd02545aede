"""One editor typing into holes on an idle server: latency per request and the prefix-cache share.

    python loadtests/typing_session.py --host http://127.0.0.1:8000 [--sessions 20] [--max-tokens 16]

The requests are those of `workloads.hole_session` (the Locust editor's sessions: the suffix fixed,
the prefix growing by 1-6 characters, 8-20 requests a hole), sent one at a time with the think
time between them, to /v1/fim/completions at temperature 0. Printed last: latency p50/p90/p99 of
every request but each session's first (which fills the cache), and the share of their prompt
tokens the server reports as cached (`usage.prompt_tokens_details.cached_tokens`); the first
requests are reported on their own line. Run it against a server nothing else is using.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import workloads as wl  # noqa: E402


def post(url: str, body: dict) -> tuple[float, dict]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    started = time.perf_counter()
    with urllib.request.urlopen(req, timeout=60) as resp:
        out = json.loads(resp.read())
    return (time.perf_counter() - started) * 1000, out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--host", required=True)
    p.add_argument("--sessions", type=int, default=20)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-think", action="store_true", help="send the next keystroke at once")
    args = p.parse_args(argv)
    cfg, rng, pool = wl.WorkloadConfig(), random.Random(args.seed), wl.SourcePool()
    url = f"{args.host.rstrip('/')}/v1/fim/completions"
    first, rest, prompt, cached, dropped = [], [], 0, 0, 0
    for _ in range(args.sessions):
        for i, cut in enumerate(wl.hole_session(pool.text(rng), rng, cfg)):
            if i and not args.no_think:
                time.sleep(wl.think_time(rng, cfg))
            ms, out = post(url, {"prefix": cut.prefix, "suffix": cut.suffix, "max_tokens": args.max_tokens,
                                 "temperature": 0})
            usage = out["usage"]
            if i == 0:
                first.append(ms)
                continue
            rest.append(ms)
            prompt += usage["prompt_tokens"]
            cached += usage["prompt_tokens_details"]["cached_tokens"]
            dropped += usage["prompt_tokens_details"].get("dropped_tokens", 0)
    rest.sort()
    first.sort()
    print(f"\n{args.host}: {args.sessions} typing sessions, {len(first) + len(rest)} requests, max_tokens "
          f"{args.max_tokens}, one at a time")
    print("| requests                     |    n |  p50 ms |  p90 ms |  p99 ms | cached share of prompt tokens |")
    print("|------------------------------|------|---------|---------|---------|-------------------------------|")
    for label, ms, share in (("keystrokes (after the first)", rest, f"{cached / max(1, prompt):.1%}"),
                             ("first request of a session", first, "-")):
        p50, p90, p99 = (wl.nearest_rank(ms, q) for q in (0.5, 0.9, 0.99))
        print(f"| {label:<28} | {len(ms):4} | {p50:7.1f} | {p90:7.1f} | {p99:7.1f} | {share:>29} |")
    print(f"prompt tokens dropped to fit the context: {dropped}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
