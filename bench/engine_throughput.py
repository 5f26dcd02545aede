"""Engine throughput and latency against two static-batching peers, all measured in this run.

What is measured: one code-completion-shaped workload (prompts of 128–1024 random tokens, 16–64
new tokens each, greedy, EOS ignored so every request generates exactly its own count) served
by a closed-loop client that keeps `--concurrency` requests in flight, on one tiny random Mixtral
checkpoint built on the fly (the same weights for every system), by

- `ours (continuous)`: EngineCore with continuous batching, chunked prefill and the paged KV cache;
- `ours (static)`: the same engine and config with `scheduling="static"`: a batch forms, then runs
  until it drains; requests arriving meanwhile wait (our own classic batching server);
- `ours (static, whole batch)`: static, with the token budget raised so the first step admits and
  prefills every waiting prompt — a batch of `--concurrency` like transformers', since under the
  default budget the static batch closes once its first member samples (see `engine_config`);
- `transformers`: `generate()` on static batches of `--concurrency` prompts, padded on the left,
  greedy, `min_new_tokens = max_new_tokens = the batch's largest count` (the ignore_eos analogue);
  the next batch starts when the previous one returns (a closed-loop client of a static server).

Why: the issue asks whether continuous batching and the paged engine pay for themselves: ≥10× the
transformers throughput and continuous ≥8× our static batching on a mixed-length workload.

How the numbers are taken (time.monotonic everywhere):
- throughput = the requests' own output tokens (a padded row's surplus tokens do not count) /
  wall time from the first submission to the last token;
- TTFT = first token − submission. For transformers the per-step times come from a `streamer`
  (generate calls `put()` once per decoding step, on the host, as soon as the step's tokens
  exist), so TTFT is the batch's prefill plus the first sample, and the submission time is the
  batch start;
- ITL = gaps between a request's consecutive tokens, pooled over all requests (vLLM's definition);
- e2e = when the client has the whole answer: the last token for the engines, the end of
  `generate()` for transformers (a static batch answers all its rows together).
All systems run in this process, one after another, with the same torch thread count.
Greedy outputs are compared across systems as a sanity check that all of them ran the same model.
"""
from __future__ import annotations

import argparse
import cProfile
import os
import random
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:       # run as `python bench/engine_throughput.py` from anywhere
    sys.path.insert(0, str(ROOT))

from serve_app.config import EngineConfig  # noqa: E402
from serve_app.engine import EngineCore, SamplingParams  # noqa: E402
from serve_app.model import load_model  # noqa: E402

from bench.roofline import ModelShape, workload_floor  # noqa: E402

# The model: a few-M-parameter Mixtral (8 experts, top-2) — big enough that matmuls, not Python,
# should dominate a step on CPU; small enough that a full run stays under ten minutes on 2 cores.
MODEL_SHAPE = dict(vocab_size=8192, hidden_size=256, num_hidden_layers=4, num_attention_heads=8,
                   num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2,
                   intermediate_size=512, max_position_embeddings=2048)


@dataclass(frozen=True)
class Workload:
    num_requests: int
    concurrency: int                 # requests in flight = transformers batch size = max_num_seqs
    prompt_len: tuple[int, int]      # inclusive range of prompt tokens
    new_tokens: tuple[int, int]      # inclusive range of tokens to generate
    seed: int = 0


# 64 requests = two waves of 32: the fewest that show what happens when requests arrive while a
# batch runs (static batching makes them wait), and a full run stays under ten minutes.
FULL = Workload(num_requests=64, concurrency=32, prompt_len=(128, 1024), new_tokens=(16, 64))
QUICK = Workload(num_requests=12, concurrency=4, prompt_len=(64, 256), new_tokens=(8, 24))


@dataclass(frozen=True)
class WorkItem:
    request_id: str
    prompt: list[int]
    max_new_tokens: int


@dataclass
class RunResult:
    name: str
    wall_s: float
    output_tokens: int
    prompt_tokens: int
    ttft_s: list[float]
    itl_s: list[float]
    e2e_s: list[float]
    tokens: dict[str, list[int]]                    # generated ids per request (sanity check)
    load: tuple[float, float]                       # 1-min load average before / after
    notes: dict[str, float] = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.wall_s


def make_workload(w: Workload, vocab: int) -> list[WorkItem]:
    rng = random.Random(w.seed)
    # Ids 0..2 are left out: pad/bos/eos in the transformers config.
    return [WorkItem(f"req-{i}", [rng.randrange(3, vocab) for _ in range(rng.randint(*w.prompt_len))],
                     rng.randint(*w.new_tokens)) for i in range(w.num_requests)]


def build_model(out_dir: Path):
    """Random Mixtral checkpoint saved as safetensors; returns (our model, the transformers model)."""
    from tests.helpers.checkpoints import build_checkpoint
    ckpt = build_checkpoint(out_dir, "mixtral", seed=0, **MODEL_SHAPE)
    return load_model(ckpt.path), ckpt.reference.eval()


# ---- our engine ---------------------------------------------------------------------------------

def engine_config(w: Workload, scheduling: str, whole_batch: bool = False) -> EngineConfig:
    """Defaults (token budget 512, prefill chunk 256) except: as many sequences as the client
    keeps in flight, and KV blocks for all of them at full length, so no preemption muddies the
    comparison. `whole_batch` (static only) makes the first step prefill every waiting prompt
    whole: the static scheduler closes a batch as soon as one member has sampled a token, which
    under the default budget happens after a few admissions, not after `concurrency`."""
    block = EngineConfig.block_size
    per_request = -(-(w.prompt_len[1] + w.new_tokens[1]) // block)
    budget = dict(max_num_batched_tokens=w.concurrency * w.prompt_len[1],
                  long_prefill_chunk=w.prompt_len[1]) if whole_batch else {}
    # No load shedding: the queue is the workload here (every request must run).
    return EngineConfig(max_num_seqs=w.concurrency, num_kv_blocks=w.concurrency * per_request + 64,
                        max_queue_delay_s=None, max_predicted_latency_s=None,
                        scheduling=scheduling, **budget)


def run_engine(model, work: list[WorkItem], w: Workload, cfg: EngineConfig, name: str,
               profiler: cProfile.Profile | None = None) -> RunResult:
    engine = EngineCore(model, cfg)
    queue, submitted = deque(work), {}
    times: dict[str, list[float]] = {item.request_id: [] for item in work}
    tokens: dict[str, list[int]] = {}

    def submit() -> None:
        item = queue.popleft()
        submitted[item.request_id] = time.monotonic()
        engine.add_request(item.request_id, item.prompt,
                           SamplingParams(max_tokens=item.max_new_tokens, temperature=0.0, ignore_eos=True))

    # Step shapes: attention pads every sequence's queries to the step's longest chunk, so a
    # step that mixes a prefill chunk with decodes computes len(q) * max(q) query rows.
    steps = {"decode": [0, 0.0, 0], "mixed": [0, 0.0, 0]}      # count, seconds, sequences
    rows_used = rows_padded = max_batch = 0
    load_before = os.getloadavg()[0]
    start = time.monotonic()
    for _ in range(min(w.concurrency, len(queue))):
        submit()
    if profiler:
        profiler.enable()
    while engine.has_unfinished():
        t0 = time.monotonic()
        outputs = engine.step()
        now = time.monotonic()
        q = [s.num_new_tokens for s in engine.last_step.scheduled]
        kind = steps["decode" if q and max(q) == 1 else "mixed"]
        kind[0], kind[1], kind[2] = kind[0] + 1, kind[1] + now - t0, kind[2] + len(q)
        rows_used, rows_padded = rows_used + sum(q), rows_padded + len(q) * max(q, default=0)
        max_batch = max(max_batch, len(q))
        for out in outputs:
            times[out.request_id].extend([now] * len(out.outputs[0].delta_token_ids))
            if out.finished:
                tokens[out.request_id] = out.outputs[0].token_ids
                if queue:
                    submit()                 # closed loop: the client sends its next request
    if profiler:
        profiler.disable()
    wall = time.monotonic() - start
    result = _summarise(name, work, submitted, times, {k: v[-1] for k, v in times.items()},
                        tokens, wall, (load_before, os.getloadavg()[0]))
    result.notes = {"steps": engine.num_steps, "decode steps": steps["decode"][0],
                    "ms/decode step": 1e3 * steps["decode"][1] / max(steps["decode"][0], 1),
                    "seqs/decode step": steps["decode"][2] / max(steps["decode"][0], 1),
                    "max seqs/step": max_batch, "mixed steps": steps["mixed"][0],
                    "ms/mixed step": 1e3 * steps["mixed"][1] / max(steps["mixed"][0], 1),
                    "attention query rows used/computed": rows_used / max(rows_padded, 1)}
    return result


# ---- transformers generate() on static batches --------------------------------------------------

class _StepClock:
    """A generate() streamer (duck-typed: generate only calls put/end) that notes when each
    decoding step's tokens exist."""

    def __init__(self):
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value) -> None:
        if not self._prompt_seen:             # the first put() is the prompt itself
            self._prompt_seen = True
            return
        self.times.append(time.monotonic())

    def end(self) -> None:
        pass


def run_transformers(hf, work: list[WorkItem], w: Workload, pad_id: int = 0) -> RunResult:
    # Legend: B = requests in the batch, S = longest prompt of the batch, n = new tokens.
    submitted, times, done, tokens = {}, {}, {}, {}
    load_before = os.getloadavg()[0]
    start = time.monotonic()
    for b in range(0, len(work), w.concurrency):
        batch = work[b:b + w.concurrency]
        arrival = time.monotonic()
        width = max(len(item.prompt) for item in batch)
        ids = torch.tensor([[pad_id] * (width - len(it.prompt)) + it.prompt for it in batch])       # [B, S]
        mask = torch.tensor([[0] * (width - len(it.prompt)) + [1] * len(it.prompt) for it in batch])  # [B, S]
        n = max(item.max_new_tokens for item in batch)
        clock = _StepClock()
        with torch.inference_mode():
            out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                              do_sample=False, pad_token_id=pad_id, streamer=clock)             # [B, S + n]
        finished = time.monotonic()
        for row, item in enumerate(batch):
            submitted[item.request_id] = arrival
            times[item.request_id] = clock.times[:item.max_new_tokens]
            done[item.request_id] = finished
            tokens[item.request_id] = out[row, width:width + item.max_new_tokens].tolist()
    wall = time.monotonic() - start
    return _summarise("transformers (static)", work, submitted, times, done, tokens, wall,
                      (load_before, os.getloadavg()[0]))


# ---- reporting ----------------------------------------------------------------------------------

def _summarise(name, work, submitted, times, done, tokens, wall, load) -> RunResult:
    ttft, itl, e2e = [], [], []
    for item in work:
        t = times[item.request_id]
        if len(t) != item.max_new_tokens:
            raise RuntimeError(f"{name}: {item.request_id} produced {len(t)} tokens, wanted {item.max_new_tokens}")
        ttft.append(t[0] - submitted[item.request_id])
        itl.extend(np.diff(t).tolist())
        e2e.append(done[item.request_id] - submitted[item.request_id])
    return RunResult(name, wall, sum(i.max_new_tokens for i in work), sum(len(i.prompt) for i in work),
                     ttft, itl, e2e, tokens, load)


def pct(values: list[float], q: float) -> float:
    return 1e3 * float(np.percentile(values, q)) if values else float("nan")


def agreement(a: RunResult, b: RunResult) -> str:
    same = sum(a.tokens[k] == b.tokens[k] for k in a.tokens)
    return f"{same}/{len(a.tokens)} requests identical"


def print_results(results: list[RunResult], w: Workload) -> None:
    hf, cont, *static = results
    print("\ngreedy outputs, continuous vs: " + "; ".join(f"{r.name} {agreement(cont, r)}" for r in (hf, *static)))
    for r in results:
        if r.notes:
            print(f"{r.name}: " + ", ".join(f"{k} {v:.3g}" for k, v in r.notes.items()))
    vs_hf = cont.tokens_per_s / hf.tokens_per_s
    print(f"\nratios: ours (continuous) / transformers = {vs_hf:.2f}x "
          f"(target >= 10x: {'MET' if vs_hf >= 10 else 'NOT MET'})")
    for r in static:
        ratio = cont.tokens_per_s / r.tokens_per_s
        print(f"        continuous / {r.name} = {ratio:.2f}x (target >= 8x: {'MET' if ratio >= 8 else 'NOT MET'})")
    print(f"\nworkload: {w.num_requests} requests, {w.concurrency} in flight, prompts {w.prompt_len[0]}-"
          f"{w.prompt_len[1]} tokens ({hf.prompt_tokens} in all), {w.new_tokens[0]}-{w.new_tokens[1]} new "
          f"tokens ({hf.output_tokens} in all), seed {w.seed}; torch threads {torch.get_num_threads()}")
    head = (f"{'system':<28}{'wall s':>7}{'out tok/s':>10}{'TTFT p50/p90/p99 ms':>22}"
            f"{'ITL p50/p90/p99 ms':>20}{'e2e p50 ms':>11}{'load':>11}")
    print(head)
    print("-" * len(head))
    for r in results:
        ttft = "/".join(f"{pct(r.ttft_s, q):.0f}" for q in (50, 90, 99))
        itl = "/".join(f"{pct(r.itl_s, q):.0f}" for q in (50, 90, 99))
        print(f"{r.name:<28}{r.wall_s:>7.1f}{r.tokens_per_s:>10.1f}{ttft:>22}{itl:>20}"
              f"{pct(r.e2e_s, 50):>11.0f}{r.load[0]:>6.1f}->{r.load[1]:<4.1f}")


def warm_up(model, hf) -> None:
    """One tiny run through each system, so first-call costs (allocators, kernels) are not timed."""
    w = Workload(num_requests=2, concurrency=2, prompt_len=(32, 48), new_tokens=(3, 4), seed=99)
    work = make_workload(w, MODEL_SHAPE["vocab_size"])
    run_transformers(hf, work, w)
    run_engine(model, work, w, engine_config(w, "continuous"), "warm-up")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke run: 12 short requests, 4 in flight")
    p.add_argument("--requests", type=int, help="override the number of requests")
    p.add_argument("--concurrency", type=int, help="override requests in flight (= transformers batch size)")
    p.add_argument("--seed", type=int, default=0)
    # One intra-op thread by default: on a shared 2-core machine two OpenMP threads are descheduled
    # independently and every op waits for the slower one (a 0.1 ms index_add_ measured 16 ms under
    # load 8); one thread keeps the comparison stable. Every system runs with the same setting.
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads for every system")
    args = p.parse_args(argv)
    w = QUICK if args.quick else FULL
    args.workload = Workload(args.requests or w.num_requests, args.concurrency or w.concurrency,
                             w.prompt_len, w.new_tokens, args.seed)
    return args


def setup(args: argparse.Namespace):
    """Threads, model (ours and transformers' copy of the same weights), workload, warm-up."""
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench-moe-") as tmp:
        model, hf = build_model(Path(tmp))
    params = sum(t.numel() for t in hf.parameters())
    print(f"model: random Mixtral, {params / 1e6:.1f}M params, {MODEL_SHAPE}", flush=True)
    warm_up(model, hf)
    return model, hf, make_workload(args.workload, MODEL_SHAPE["vocab_size"])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    w = args.workload
    model, hf, work = setup(args)
    systems = (
        ("transformers (static)", lambda: run_transformers(hf, work, w)),
        ("ours (continuous)", lambda: run_engine(model, work, w, engine_config(w, "continuous"),
                                                 "ours (continuous)")),
        ("ours (static)", lambda: run_engine(model, work, w, engine_config(w, "static"), "ours (static)")),
        ("ours (static, whole batch)", lambda: run_engine(model, work, w, engine_config(w, "static", True),
                                                          "ours (static, whole batch)")))
    results = []
    for name, run in systems:
        print(f"running {name} ...", flush=True)
        results.append(run())
        print(f"  {results[-1].wall_s:.1f} s, {results[-1].tokens_per_s:.1f} output tok/s", flush=True)
    print_results(results, w)
    print_floor(results, work)
    return 0


def print_floor(results: list[RunResult], work: list[WorkItem]) -> None:
    """How far any engine could get on this machine (bench/roofline.py), next to the ratios."""
    floor = workload_floor(ModelShape.from_hf(MODEL_SHAPE), [(len(i.prompt), i.max_new_tokens) for i in work])
    hf, cont, *static = results
    print(f"\ncompute floor: {floor.gflop:.0f} GFLOP necessary, best fp32 matmul {floor.peak_gflops:.0f} GFLOP/s "
          f"at these shapes ({torch.get_num_threads()} thread(s)) -> {floor.seconds:.1f} s for any engine")
    print(f"best possible ratio over transformers: {floor.best_ratio(hf.wall_s):.2f}x (target 10x); "
          + "; ".join(f"over {r.name}: {floor.best_ratio(r.wall_s):.2f}x (target 8x)" for r in static))
    print("share of that peak each system used: "
          + ", ".join(f"{r.name} {floor.efficiency(r.wall_s):.0%}" for r in results))


if __name__ == "__main__":
    sys.exit(main())
