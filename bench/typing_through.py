"""Typing-through drafts: an editor whose user types the suggestion, with and without the drafts.

The same session is sent to two copies of the embedded app over the bundled model (in this process,
over ASGI, no TCP), one with `typing_through` on, one off, request by request in turn (A B A B), so
drift hits both alike. A session: a hole in a standard-library file (`workloads.hole_session`'s
window and suffix); the first request asks at the cursor; then the user types the ghost text the
server shows, 1-`--chars` characters a keystroke, each keystroke a new request, until the
suggestion is typed or `--keystrokes` are sent. Both copies should answer every request with the
same text (greedy): the drafts change the steps, not the output. That holds exactly where a
verification pass computes the logits that single-token steps would (float32 full precision; the
quantized lanes where their kernels are row-count invariant: engine/speculative.py, "Exactness");
elsewhere a near-tie can flip: the bench counts the answers that differ, and a session whose
answers differ goes on with the typing-through copy's text. Printed: latency
p50/p90 and engine steps per keystroke request, each way, and the share of drafts kept.

    python bench/typing_through.py [--sessions 20] [--keystrokes 6] [--chars 3] [--max-tokens 16]
                                   [--precision auto|full]
"""
from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "loadtests"))

import httpx  # noqa: E402

import workloads as wl  # noqa: E402
from serve_app.config import AppConfig  # noqa: E402
from serve_app.embedded import build_embedded_app  # noqa: E402


class Copy:
    """One embedded app and the counters of its engines."""

    def __init__(self, on: bool, precision: str):
        self.app = build_embedded_app(AppConfig(typing_through=on))
        self.client = httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app), base_url="http://bench",
                                        timeout=120)
        self.precision = precision

    def engine_steps(self) -> int:
        return sum(e.core.num_steps for e in self.app.state.engine.engines.values())

    def spec(self) -> tuple[float, float]:
        """(draft tokens proposed, kept) so far, from this app's /metrics registry."""
        from prometheus_client.parser import text_string_to_metric_families

        totals = {"moe_spec_draft_tokens": 0.0, "moe_spec_accepted_tokens": 0.0}
        for family in text_string_to_metric_families(self.app.state.metrics.exposition().decode()):
            if family.name in totals:
                totals[family.name] += sum(s.value for s in family.samples if s.name.endswith("_total"))
        return totals["moe_spec_draft_tokens"], totals["moe_spec_accepted_tokens"]

    async def fim(self, prefix: str, suffix: str, max_tokens: int) -> tuple[str, float, int]:
        """(the completion, ms, engine steps it took)."""
        steps, started = self.engine_steps(), time.perf_counter()
        got = await self.client.post("/v1/fim/completions", json={"prefix": prefix, "suffix": suffix,
                                                                  "max_tokens": max_tokens, "temperature": 0,
                                                                  "precision": self.precision})
        ms = (time.perf_counter() - started) * 1000
        got.raise_for_status()
        return got.json()["completion"], ms, self.engine_steps() - steps

    def close(self):
        self.app.state.engine.shutdown()


def pct(xs: list[float], q: float) -> float:
    return wl.nearest_rank(sorted(xs), q)


async def run(args) -> int:
    rng, pool, cfg = random.Random(args.seed), wl.SourcePool(), wl.WorkloadConfig()
    on, off = Copy(True, args.precision), Copy(False, args.precision)
    rows = []               # per keystroke: (its answer continues the typed suggestion, {copy: (ms, steps)})
    same = differ = 0
    try:
        for _ in range(args.sessions):
            cut = wl.hole_session(pool.text(rng), rng, cfg)[0]
            prefix, suffix, rest = cut.prefix, cut.suffix, None
            for k in range(args.keystrokes + 1):
                got = {}
                for copy in ((on, off) if k % 2 else (off, on)):          # alternate who goes first
                    got[copy] = await copy.fim(prefix, suffix, args.max_tokens)
                shown = got[on][0]
                same, differ = same + (shown == got[off][0]), differ + (shown != got[off][0])
                if rest is not None:
                    continues = bool(shown) and (shown.startswith(rest) or rest.startswith(shown))
                    rows.append((continues, {c: got[c][1:] for c in (on, off)}))
                if not shown.strip():
                    break
                typed = shown[:rng.randint(1, args.chars)]                # the user types the ghost text
                prefix, rest = prefix + typed, shown[len(typed):]
    finally:
        spec = {"on": on.spec(), "off": off.spec()}
        on.close()
        off.close()
    print(f"\n{args.sessions} sessions, {len(rows)} keystroke requests each way (after each session's first), "
          f"{same} answers identical both ways, {differ} different; load average {os.getloadavg()[0]:.2f}")
    print("| keystrokes | n | typing-through | p50 ms | p90 ms | engine steps per request (mean) |")
    print("|---|---|---|---|---|---|")
    for label, picked in (("all", rows), ("the answer continues the suggestion typed", [r for r in rows if r[0]]),
                          ("the answer changed", [r for r in rows if not r[0]])):
        for name, copy in (("off", off), ("on", on)):
            ms = [r[1][copy][0] for r in picked]
            steps = [r[1][copy][1] for r in picked]
            if ms:
                print(f"| {label} | {len(ms)} | {name} | {pct(ms, 0.5):.1f} | {pct(ms, 0.9):.1f} | "
                      f"{statistics.mean(steps):.2f} |")
    for name, (drafted, kept) in spec.items():   # full precision also drafts with its INT8 copy, both ways
        print(f"typing-through {name}: drafts kept {kept:.0f} of {drafted:.0f} ({kept / max(1, drafted):.1%})")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sessions", type=int, default=20)
    p.add_argument("--keystrokes", type=int, default=6)
    p.add_argument("--chars", type=int, default=3, help="most characters of the ghost text typed per keystroke")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision", choices=["auto", "full", "int8", "int4"], default="auto",
                   help="auto: the tier classifier decides (inline holes go to the INT4 lane)")
    return asyncio.run(run(p.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
