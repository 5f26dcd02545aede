"""Full precision over the expert shards against every expert local: same model, same requests, same run.

Two layouts of the same `moe-serve` app on one local Ray cluster, deployed in turn, round by round
(A B A B ...), so drift on the machine hits both alike:
  - "2 shards": expert_shards=2, the MoE layers' rows cross the data plane (`--transport`);
  - "all local": expert_shards=0, the Router computes every expert itself.
Two workloads, one request at a time (an editor's latency, not throughput), over HTTP:
  - inline: a FIM hole mid-line in a standard-library file, 16 tokens, temperature 0, precision
    "full" (the classifier would put it on the INT4 lane, which never leaves the Router);
  - complex: the cursor under a new `def` header with no body, as the classifier sends it: tier
    complex, best of 3 candidates at full precision, a fixed seed so both layouts sample alike.
Greedy (and seeded) outputs must be identical in both layouts: expert parallelism is exact.
Targets (issue #16): inline through 2 shards <= 1.5x all-local; complex p50 <= 500 ms through 2 shards.

    python bench/expert_parallel.py [--rounds 2] [--inline 30] [--complex 12] [--transport socket] [--speculative K]
"""
from __future__ import annotations

import argparse
import os
import random
import re
import statistics
import sys
import sysconfig
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from serve_app.cli import direct_ingress_env, free_port, start_serve, wait_healthy  # noqa: E402

PORT = free_port()
os.environ.update(direct_ingress_env(PORT))     # read when Ray's modules are imported

import httpx  # noqa: E402

DEF = re.compile(r"^( *)def \w+\(.*\):[ \t]*\n", re.M)


def stdlib_files(n: int, rng: random.Random) -> list[str]:
    paths = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    texts = [p.read_text(errors="replace") for p in rng.sample(paths, min(len(paths), 4 * n))]
    return [t for t in texts if 40 < t.count("\n") and len(t) < 200_000]


def inline_holes(files: list[str], n: int, rng: random.Random) -> list[tuple[str, str]]:
    """(prefix, suffix) with the cursor in the middle of a code line (past its indentation)."""
    holes = []
    for text in files:
        lines = text.splitlines(keepends=True)
        candidates = [i for i, line in enumerate(lines[20:], 20) if len(line.strip()) > 12]
        if candidates:
            i = rng.choice(candidates)
            line = lines[i]
            cut = len(line) - len(line.lstrip()) + len(line.strip()) // 2
            holes.append(("".join(lines[:i]) + line[:cut], line[cut:] + "".join(lines[i + 1:])))
        if len(holes) == n:
            break
    return holes


def complex_holes(files: list[str], n: int, rng: random.Random) -> list[tuple[str, str]]:
    """(prefix, suffix): the prefix ends with a def header and the body's indentation; the suffix
    resumes after the body (the function is to be written)."""
    holes = []
    for text in files:
        defs = list(DEF.finditer(text))
        if not defs:
            continue
        m = rng.choice(defs)
        indent = len(m.group(1))
        rest = text[m.end():].splitlines(keepends=True)
        end = next((k for k, line in enumerate(rest) if line.strip() and len(line) - len(line.lstrip()) <= indent),
                   len(rest))
        holes.append((text[:m.end()] + " " * (indent + 4), "\n" + "".join(rest[end:])))
        if len(holes) == n:
            break
    return holes


def run_layout(client: httpx.Client, url: str, inline, complex_, seed: int) -> dict:
    out = {"inline": [], "complex": [], "texts": [], "tiers": set()}
    for prefix, suffix in inline[:2] + complex_[:1]:                      # warm-up: lanes, shards, caches
        client.post(f"{url}/v1/fim/completions", json={"prefix": prefix, "suffix": suffix, "max_tokens": 4,
                                                       "precision": "full"})
    for kind, holes in (("inline", inline), ("complex", complex_)):
        for prefix, suffix in holes:
            body = {"prefix": prefix, "suffix": suffix, "seed": seed}
            body.update({"max_tokens": 16, "temperature": 0, "precision": "full"} if kind == "inline" else {})
            started = time.perf_counter()
            r = client.post(f"{url}/v1/fim/completions", json=body)
            seconds = time.perf_counter() - started
            r.raise_for_status()
            got = r.json()
            out["texts"].append(got["completion"])
            out["tiers"].add((kind, got.get("tier"), got.get("precision")))
            # A "complex" hole the classifier read otherwise (a body found below) is not counted.
            if kind == "inline" or (got.get("tier"), got.get("precision")) == ("complex", "full"):
                out[kind].append(seconds)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="checkpoint directory (default: the bundled model)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--inline", type=int, default=30, help="inline requests per layout per round")
    p.add_argument("--complex", type=int, default=12, help="complex holes per layout per round (only those "
                   "the classifier puts in the complex tier are timed)")
    p.add_argument("--transport", choices=("socket", "serve"), default="socket")
    p.add_argument("--speculative", type=int, default=None,
                   help="engine.speculative_tokens for both layouts (default: the app's default)")
    args = p.parse_args(argv)

    import ray
    from ray import serve

    from serve_app.config import AppConfig, default_model_dir
    from serve_app.deployments.app import build_app

    rng = random.Random(0)
    files = stdlib_files(args.inline + args.complex, rng)
    inline, complex_ = inline_holes(files, args.inline, rng), complex_holes(files, args.complex, rng)
    model = args.model or default_model_dir()
    layouts = {"2 shards": 2, "all local": 0}
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
    start_serve("127.0.0.1")
    url = f"http://127.0.0.1:{PORT}"
    results = {name: {"inline": [], "complex": []} for name in layouts}
    texts = {name: [] for name in layouts}
    try:
        with httpx.Client(timeout=120) as client:
            for r in range(args.rounds):
                for name, shards in layouts.items():
                    engine = {} if args.speculative is None else {"speculative_tokens": args.speculative}
                    config = AppConfig(model=model, expert_shards=shards, expert_transport=args.transport,
                                       engine=engine, port=PORT)
                    serve.run(build_app(config), name="moe-serve", route_prefix="/")
                    wait_healthy(url, 180)
                    got = run_layout(client, url, inline, complex_, seed=1234)
                    print(f"round {r + 1} {name}: inline p50 {statistics.median(got['inline']) * 1e3:.1f} ms, "
                          f"complex p50 {statistics.median(got['complex']) * 1e3:.1f} ms "
                          f"({len(got['complex'])} of {len(complex_)} in the complex tier), "
                          f"load {os.getloadavg()[0]:.1f}", flush=True)
                    for kind in ("inline", "complex"):
                        results[name][kind] += got[kind]
                    texts[name].append(got["texts"])
                    serve.delete("moe-serve")
    finally:
        serve.shutdown()
        ray.shutdown()
    identical = all(t == texts["all local"][0] for ts in texts.values() for t in ts)
    print(f"\nmodel {model}; transport {args.transport}; speculative_tokens {args.speculative}; {args.rounds} rounds; {len(inline)} inline + "
          f"{len(complex_)} complex requests per layout per round; outputs identical across layouts and "
          f"rounds: {identical}")
    print(f"{'layout':<12}{'inline p50':>12}{'inline p80':>12}{'complex p50':>13}{'complex p80':>13}   ms")
    for name, got in results.items():
        q = {k: statistics.quantiles(v, n=10) for k, v in got.items()}
        print(f"{name:<12}{statistics.median(got['inline']) * 1e3:>12.1f}{q['inline'][7] * 1e3:>12.1f}"
              f"{statistics.median(got['complex']) * 1e3:>13.1f}{q['complex'][7] * 1e3:>13.1f}")
    ratio = statistics.median(results["2 shards"]["inline"]) / statistics.median(results["all local"]["inline"])
    print(f"inline p50, 2 shards / all local: {ratio:.2f}x (target <= 1.5x); complex p50 through 2 shards "
          f"{statistics.median(results['2 shards']['complex']) * 1e3:.0f} ms (target <= 500 ms)")
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
