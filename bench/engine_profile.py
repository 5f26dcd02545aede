"""Where the continuous-batching engine spends a step, on the workload of engine_throughput.py.

What is measured:
1. a cProfile of `ours (continuous)` on the same workload (top functions by own time), to show
   which part of a step is slow — not a throughput number (profiling adds its own overhead);
2. one layer of paged attention for the step shape that dominates continuous batching under a
   closed-loop client: 31 sequences decoding (1 new token each) next to one sequence prefilling a
   256-token chunk, all at ~1k tokens of context. `paged_attention` pads every sequence's queries
   to the step's longest chunk, so it is timed once as the engine calls it (one padded call) and,
   as the peer in the same run, split by query length (decodes together, the chunk alone) — the
   same outputs for ~1/30 of the query rows.

Why: engine_throughput.py shows continuous batching losing to static batching on this workload;
this says where the time goes, with evidence, so the fix goes to the right place.
"""
from __future__ import annotations

import cProfile
import pstats
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.engine_throughput import MODEL_SHAPE, engine_config, parse_args, run_engine, setup  # noqa: E402
from serve_app.model.attention import AttentionMetadata, paged_attention  # noqa: E402


def time_attention(meta_and_qkv, k_cache, v_cache, scale: float, reps: int) -> float:
    """Median seconds of paged_attention over the given (meta, q, k, v) parts, run one after another."""
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        for meta, q, k, v in meta_and_qkv:
            paged_attention(q, k, v, k_cache, v_cache, meta, scale)
        samples.append(time.perf_counter() - start)
    return sorted(samples)[len(samples) // 2]


def attention_padding(decodes: int = 31, context: int = 1024, chunk: int = 256, block: int = 16,
                      reps: int = 5) -> None:
    heads, kv_heads = MODEL_SHAPE["num_attention_heads"], MODEL_SHAPE["num_key_value_heads"]
    head_dim = MODEL_SHAPE["hidden_size"] // heads
    per_seq = -(-(context + chunk) // block)
    gen = torch.Generator().manual_seed(0)
    k_cache = torch.randn((decodes + 1) * per_seq, block, kv_heads, head_dim, generator=gen)  # [N, S, G, Dh]
    v_cache = torch.randn_like(k_cache)
    tables = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(decodes + 1)]
    positions = [[context]] * decodes + [list(range(context - chunk, context))]

    def part(seqs: slice):
        meta = AttentionMetadata.build(positions[seqs], tables[seqs], block)
        tokens = meta.positions.shape[0]
        return (meta, torch.randn(tokens, heads, head_dim, generator=gen),          # q [T, H, Dh]
                torch.randn(tokens, kv_heads, head_dim, generator=gen),             # k [T, G, Dh]
                torch.randn(tokens, kv_heads, head_dim, generator=gen))             # v [T, G, Dh]

    scale = head_dim ** -0.5
    with torch.inference_mode():
        padded = time_attention([part(slice(None))], k_cache, v_cache, scale, reps)
        dec = time_attention([part(slice(0, decodes))], k_cache, v_cache, scale, reps)
        pre = time_attention([part(slice(decodes, None))], k_cache, v_cache, scale, reps)
    rows, used = (decodes + 1) * chunk, decodes + chunk
    print(f"\none layer of paged attention, {decodes} decodes + one {chunk}-token prefill chunk at "
          f"{context} tokens of context (median of {reps}):")
    print(f"{'as the engine calls it (one padded call)':<46}{1e3 * padded:>9.1f} ms  "
          f"({rows} query rows computed, {used} used)")
    print(f"{'split by query length (decodes + chunk)':<46}{1e3 * (dec + pre):>9.1f} ms  "
          f"(decodes {1e3 * dec:.1f} ms + chunk {1e3 * pre:.1f} ms)")
    print(f"{'padding overhead':<46}{padded / (dec + pre):>9.1f} x")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    model, _, work = setup(args)
    w = args.workload
    profiler = cProfile.Profile()
    result = run_engine(model, work, w, engine_config(w, "continuous"), "ours (continuous)", profiler)
    print(f"\ncProfile of ours (continuous): {result.wall_s:.1f} s wall, top 15 by own time")
    pstats.Stats(profiler).sort_stats("tottime").print_stats(15)
    print(", ".join(f"{k} {v:.3g}" for k, v in result.notes.items()))
    attention_padding()
    return 0


if __name__ == "__main__":
    sys.exit(main())
