"""Where one inline completion's time goes, stage by stage, in-process on an idle machine.

The requests are the editor's typing sessions (loadtests/workloads.hole_session: the suffix fixed,
the prefix growing by 1-6 characters), each session's first request filling the prefix cache and
not counted. Per request, measured in this process through the engine the server runs (the fast
lane as the Router builds it: quantized weights, bf16 activations where they win):

- tokenize: building the FIM prompt (trimming included) from prefix and suffix;
- prefill: the step that computes the uncached prompt tokens (and samples the first token);
- decode: each following step (one token each), and their sum;
- detokenize: the incremental detokenizer and stop checks, inside the steps (measured apart).

What the HTTP server adds on top (parsing, the event loop, the Ingress → Router hop under Ray) is
the difference to `loadtests/typing_session.py` run against a server on the same requests; both
numbers go into docs/benchmarks.md side by side.

    python bench/request_budget.py [--sessions 6] [--precision int4] [--max-tokens 16]
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "loadtests"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import workloads as wl  # noqa: E402
from serve_app.api.settings import GenerationDefaults  # noqa: E402
from serve_app.config import AppConfig  # noqa: E402
from serve_app.embedded import load_served_model  # noqa: E402
from serve_app.engine.core import EngineCore  # noqa: E402
from serve_app.engine.sampling_params import SamplingParams  # noqa: E402
from serve_app.tokenizer import CodeTokenizer  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sessions", type=int, default=6)
    ap.add_argument("--precision", default="int4", help="int4: what the classifier picks for these holes")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    config = AppConfig()
    config.process_settings().apply()
    model_dir = config.model
    tok = CodeTokenizer.from_dir(model_dir)
    model = load_served_model(config)
    engine_cfg = config.engine_config()
    core = EngineCore(model, engine_cfg, tok, dtype=model.reduced_dtype)
    penalty = GenerationDefaults.from_model_dir(model_dir).frequency_penalty
    rng, pool, cfg = random.Random(args.seed), wl.SourcePool(), wl.WorkloadConfig()
    rows, n = [], 0
    detok_s = [0.0]
    original = core._append_token

    def timed_append(seq, token, lp):              # the detokenizer and stop checks run in here
        start = time.perf_counter()
        original(seq, token, lp)
        detok_s[0] += time.perf_counter() - start
    core._append_token = timed_append
    with torch.inference_mode():
        for _ in range(args.sessions):
            for i, cut in enumerate(wl.hole_session(pool.text(rng), rng, cfg)):
                detok_s[0] = 0.0
                start = time.perf_counter()
                prompt = tok.build_fim_prompt(cut.prefix, cut.suffix, core.max_model_len - args.max_tokens)
                tokenized = time.perf_counter()
                core.add_request(f"r{n}", prompt.ids, SamplingParams(max_tokens=args.max_tokens, temperature=0,
                                                                     frequency_penalty=penalty),
                                 precision=args.precision)
                n += 1
                steps, out = [], []
                while core.has_unfinished():
                    s = time.perf_counter()
                    out = core.step()
                    steps.append(time.perf_counter() - s)
                if i:
                    final = out[0]
                    rows.append({"tokenize": tokenized - start, "prefill": steps[0], "decode_step":
                                 statistics.median(steps[1:]) if len(steps) > 1 else 0.0,
                                 "decode_sum": sum(steps[1:]), "decode_steps": len(steps) - 1,
                                 "detokenize": detok_s[0], "total": time.perf_counter() - start,
                                 "uncached": len(prompt.ids) - final.num_cached_tokens, "prompt": len(prompt.ids)})
    print(f"\n{len(rows)} keystroke requests ({args.sessions} sessions), {args.precision}, max_tokens "
          f"{args.max_tokens}, {torch.get_num_threads()} torch thread(s), fast lane {model.reduced_dtype}")
    print("| stage                                   | median | p90 |")
    print("|-----------------------------------------|--------|-----|")
    for key, label, scale in (("tokenize", "tokenize (FIM prompt + fit), ms", 1e3),
                              ("prefill", "prefill step, ms", 1e3), ("uncached", "  uncached prompt tokens", 1),
                              ("prompt", "  prompt tokens", 1), ("decode_step", "one decode step, ms", 1e3),
                              ("decode_steps", "  decode steps", 1), ("decode_sum", "all decode steps, ms", 1e3),
                              ("detokenize", "detokenize + stop checks (in the steps), ms", 1e3),
                              ("total", "in-process total, ms", 1e3)):
        vals = sorted(r[key] * scale for r in rows)
        print(f"| {label:<39} | {statistics.median(vals):6.1f} | {vals[int(0.9 * (len(vals) - 1))]:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
