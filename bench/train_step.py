"""Training speed of the default model's shape: float32 against bf16 autocast (and torch.compile).

Issue 15 asks which is faster on this machine without hurting the loss curve. Each variant trains
the same seeded model on the same batches (the default-model shape, batch × 1024 tokens of the
real corpus when a sample cache is given, else random ids), interleaved round by round so a burst
of load hits every variant alike; it prints tokens/s per variant and the loss after the same steps.

    python bench/train_step.py [--threads 2] [--batch-size 4] [--steps 6] [--rounds 3] [--compile]
        [--samples RUN_DIR/train_samples.pt]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from serve_app.model.kernels import cpu_features  # noqa: E402
from serve_app.train.recipe import TrainConfig  # noqa: E402
from serve_app.train.train import build_model, compute_loss, make_optimizer, resolve_autocast  # noqa: E402

SHAPE = dict(hidden_size=192, num_layers=4, num_heads=6, num_kv_heads=3, moe_intermediate_size=384)


def batches(args, cfg: TrainConfig) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    if args.samples:
        saved = torch.load(args.samples, weights_only=True)
        ids, num = saved["input_ids"].long(), saved["num_tokens"].long()
        rows = torch.randperm(len(ids), generator=gen)[: args.steps * args.batch_size]
        return [(ids[r], num[r]) for r in rows.view(args.steps, args.batch_size)]
    return [(torch.randint(5, cfg.vocab_size, (args.batch_size, cfg.max_len), generator=gen),
             torch.full((args.batch_size,), cfg.max_len)) for _ in range(args.steps)]


def run(variant: str, cfg: TrainConfig, data, device: str) -> tuple[float, float]:
    """(seconds for the steps after the first, loss of the last step) for a fresh seeded model."""
    model = build_model(cfg, eos_id=0).to(device)
    model.train()
    opt = make_optimizer(model, cfg)
    if variant.endswith("compile"):
        model.forward_train = torch.compile(model.forward_train, dynamic=False)
    autocast = "bfloat16" if variant.startswith("bf16") else ""
    times, loss = [], float("nan")
    for ids, num in data:
        t0 = time.perf_counter()
        losses = compute_loss(model, ids.to(device), num.to(device), cfg.aux_loss_coef, autocast)
        opt.zero_grad(set_to_none=True)
        losses.total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        loss = losses.lm
    return sum(times[1:]), loss       # the first step pays one-off costs (allocation, compilation)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile variants")
    parser.add_argument("--samples", type=Path, help="a train_samples.pt cache: real batches")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = TrainConfig(**SHAPE, batch_size=args.batch_size)
    data = batches(args, cfg)
    tokens = sum(int(n.sum()) for _, n in data[1:])
    variants = ["fp32", "bf16"] + (["fp32 compile", "bf16 compile"] if args.compile else [])
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu {cpu_features()}"
    print(f"{where}  threads {args.threads}  batch {args.batch_size} x {cfg.max_len}")
    seconds: dict[str, list[float]] = {v: [] for v in variants}
    losses: dict[str, float] = {}
    for _ in range(args.rounds):
        for v in variants:
            s, losses[v] = run(v, cfg, data, args.device)
            seconds[v].append(s)
    print(f"{'variant':14s} {'tokens/s':>9s} {'vs fp32':>8s} {'loss after':>11s}")
    base = tokens / statistics.median(seconds["fp32"])
    for v in variants:
        rate = tokens / statistics.median(seconds[v])
        print(f"{v:14s} {rate:9.0f} {rate / base:7.2f}x {losses[v]:11.4f}")
    print(f"TrainConfig.autocast 'auto' trains in {resolve_autocast('auto', args.device) or 'float32'} here")


if __name__ == "__main__":
    main()
