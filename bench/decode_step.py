"""The engine's decode step per lane and batch size, next to the weight-bytes floor.

What is measured: `EngineCore.step()` (schedule → forward → sample → update), in-process, on the
bundled default model, with B sequences decoding at ~`--context` tokens of context each, for each
lane as the server builds it (full precision in the checkpoint's dtype; INT8 and INT4 in the fast
lane's dtype, every linear quantized). Per (lane, B): the median step time over `--steps` steps,
interleaved lane by lane in rounds so a burst of load hits every lane alike.

The floor, measured in the same run: the bytes a step must read — the dense weights and LM head,
the experts the step's tokens were routed to (counted from the engine's own expert load), and the
K/V of every sequence's context — divided by the memory bandwidth of one streaming read (a
`sum` over a buffer far larger than L3) in the same process. A step cannot be faster than that
on this machine; the ratio says how far the Python/dispatch overhead is from it.

With `--torch-path` every (lane, batch) also runs with the fused CPU kernels off
(serve_app/model/cpu_kernels: the pure-torch path, the reference), interleaved with it.

    python bench/decode_step.py [--threads 1] [--batches 1,4,8,16] [--context 512] [--steps 30] [--torch-path]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from serve_app.config import AppConfig, EngineConfig, default_model_dir  # noqa: E402
from serve_app.embedded import load_served_model  # noqa: E402
from serve_app.engine.core import EngineCore  # noqa: E402
from serve_app.engine.sampling_params import SamplingParams  # noqa: E402
from serve_app.model import cpu_kernels  # noqa: E402
from serve_app.model.kernels import cpu_features  # noqa: E402


def bandwidth_gbs(mb: int = 512, reps: int = 5) -> float:
    """GB/s of one streaming read (float32 sum) over a buffer far larger than the caches."""
    buf = torch.ones(mb * (1 << 20) // 4)
    buf.sum()
    best = min(_timed(buf.sum) for _ in range(reps))
    return buf.numel() * 4 / best / 1e9


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def tensor_bytes(obj) -> int:
    return sum(t.numel() * t.element_size() for t in obj.state_dict().values())


def step_bytes(model, lane: str, expert_load: torch.Tensor, steps: int, context: int, batch: int,
               kv_elem: int) -> float:
    """Bytes one step reads: dense weights of this lane, the experts touched, the KV of the context."""
    cfg = model.config
    if lane == "full":
        dense = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                    if not n.startswith("local_experts"))
        per_expert = tensor_bytes(model.local_experts.ffn[next(iter(model.local_experts.ffn))])
    else:
        dense = sum(lin.reduced[lane].nbytes() for lin in model.modules() if getattr(lin, "reduced", None))
        dense += model.embed_tokens.weight.shape[1] * model.embed_tokens.weight.element_size() * batch
        per_expert = model._backends.reduced[lane].bytes_per_expert()
    touched = (expert_load > 0).sum().item() / max(1, steps)         # experts hit per step, all layers
    kv = cfg.num_layers * 2 * batch * context * cfg.num_kv_heads * cfg.head_dim * kv_elem
    return dense + touched * per_expert + kv


def run_lane(model, lane: str, batch: int, context: int, steps: int, dtype) -> tuple[float, float]:
    """(median step seconds, bytes per step) for `batch` sequences decoding at `context`."""
    # The plain decode step: one token per sequence per step (speculative decoding off).
    core = EngineCore(model, EngineConfig(max_num_seqs=max(16, batch), speculative_tokens=0), dtype=dtype)
    core.runner.track_expert_load()
    gen = torch.Generator().manual_seed(batch)
    params = SamplingParams(max_tokens=steps + 8, temperature=0, ignore_eos=True)
    for i in range(batch):
        prompt = torch.randint(100, model.config.vocab_size, (context,), generator=gen).tolist()
        core.add_request(f"r{i}", prompt, params, precision=lane)
    while core.scheduler.waiting or any(s.num_computed_tokens < context for s in core.scheduler.running):
        core.step()                                                   # prefill, outside the timing
    for _ in range(3):
        core.step()
    core.runner.take_expert_load()
    times = [_timed(core.step) for _ in range(steps)]
    load = core.runner.take_expert_load()
    kv_elem = core.runner.kv.k.element_size()
    return statistics.median(times), step_bytes(model, lane, load, steps, context, batch, kv_elem)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batches", default="1,4,8,16")
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--model", default=default_model_dir())
    p.add_argument("--torch-path", action="store_true", help="also time each lane with the fused CPU kernels off")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = load_served_model(AppConfig(model=args.model))
    lanes = {"full": None, "int8": model.reduced_dtype, "int4": model.reduced_dtype}
    paths = ("fused", "torch") if args.torch_path else ("fused",)
    gbs = bandwidth_gbs()
    print(f"machine: {os.cpu_count()} cpus, features {' '.join(cpu_features())}, torch {torch.__version__} "
          f"({torch.backends.cpu.get_cpu_capability()}), {args.threads} thread(s); load {os.getloadavg()[0]:.2f}")
    print(f"model: {Path(args.model).name}, full precision in {model.embed_tokens.weight.dtype}, "
          f"fast lane in {model.reduced_dtype}; streaming read {gbs:.1f} GB/s")
    batches = [int(b) for b in args.batches.split(",")]
    samples: dict[tuple[str, int], list[float]] = {}
    nbytes: dict[tuple[str, int], float] = {}
    with torch.inference_mode():
        for _ in range(args.rounds):
            for batch in batches:
                for lane, dtype in lanes.items():
                    for path in paths:
                        if path == "torch":
                            with cpu_kernels.disabled():
                                t, b = run_lane(model, lane, batch, args.context, args.steps, dtype)
                        else:
                            t, b = run_lane(model, lane, batch, args.context, args.steps, dtype)
                        samples.setdefault((lane, batch, path), []).append(t)
                        nbytes[(lane, batch, path)] = b
    print(f"\ndecode step, {args.context} tokens of context per sequence (median of {args.rounds} rounds "
          f"x {args.steps} steps)")
    ops = cpu_kernels.ops()
    print(f"fused CPU kernels: {'built' if ops is not None else 'unavailable'}"
          + (f", quantized matmuls on {ops.quant_gemm_isa()}" if ops is not None else ""))
    print(f"{'lane':<6}{'batch':>6}{'path':>7}{'step ms':>10}{'MB read':>10}{'floor ms':>10}{'x floor':>9}{'ms/token':>10}")
    for (lane, batch, path), ts in samples.items():
        t = statistics.median(ts)
        floor = nbytes[(lane, batch, path)] / (gbs * 1e9)
        print(f"{lane:<6}{batch:>6}{path:>7}{t * 1e3:>10.2f}{nbytes[(lane, batch, path)] / 1e6:>10.2f}"
              f"{floor * 1e3:>10.3f}{t / floor:>9.1f}{t * 1e3 / batch:>10.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
