"""The serving path's own cost, without the model's: sequential tiny requests against a server.

    python loadtests/overhead.py --host http://127.0.0.1:8000 [--requests 40]

Under load the engine's time hides everything else; a one-token completion of a one-token
prompt, sent one at a time, is almost all HTTP, tokenization, the Ingress → Router hop (under Ray)
and one engine step. `GET /v1/models` answers from the Ingress alone (no engine, no hop). Run it
against `moe-serve` and `moe-serve --embedded` back to back: the difference is what Ray costs
per request. Prints a short table last.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import urllib.request


def timed(url: str, body: dict | None) -> float:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    started = time.perf_counter()
    with urllib.request.urlopen(req, timeout=60) as resp:
        resp.read()
    return (time.perf_counter() - started) * 1000


# ignore_eos is not in the API: a prompt whose greedy continuation is long enough does it.
LONG = {"prompt": "import os\n\n\ndef main(argv):\n", "max_tokens": 16, "temperature": 0, "precision": "int4"}


def measure(host: str, requests: int) -> dict[str, list[float]]:
    probes = {
        "GET /v1/models (ingress only)": (f"{host}/v1/models", None),
        "POST /v1/completions, 1 token": (f"{host}/v1/completions",
                                          {"prompt": "x", "max_tokens": 1, "temperature": 0}),
        "POST /v1/fim/completions, 1 token": (f"{host}/v1/fim/completions",
                                              {"prefix": "x = ", "suffix": "\n", "max_tokens": 1, "temperature": 0}),
        # The same 16 greedy tokens whole and streamed: streaming sends one message per token from
        # the engine to the HTTP side; a non-streaming request asks for the finished output only.
        "POST /v1/completions, 16 tok": (f"{host}/v1/completions", LONG),
        "POST /v1/completions, 16 tok, stream": (f"{host}/v1/completions", {**LONG, "stream": True}),
    }
    for url, body in probes.values():            # warm-up: first calls build caches and connections
        timed(url, body)
    times: dict[str, list[float]] = {name: [] for name in probes}
    for _ in range(requests):                    # interleaved, so load changes hit every probe alike
        for name, (url, body) in probes.items():
            times[name].append(timed(url, body))
    return times


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", required=True)
    p.add_argument("--requests", type=int, default=40)
    args = p.parse_args(argv)
    times = measure(args.host.rstrip("/"), args.requests)
    print(f"\n{args.host}: {args.requests} sequential requests each")
    print(f"| {'probe':<36} | {'p50 ms':>7} | {'p90 ms':>7} | {'min ms':>7} |")
    print(f"|{'-' * 38}|{'-' * 9}|{'-' * 9}|{'-' * 9}|")
    for name, ms in times.items():
        ms = sorted(ms)
        print(f"| {name:<36} | {statistics.median(ms):>7.1f} | {ms[int(0.9 * (len(ms) - 1))]:>7.1f} | {ms[0]:>7.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
