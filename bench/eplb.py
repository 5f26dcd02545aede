"""Expert placement by measured load (serve_app/parallel/eplb.py) on the bundled model's real routing.

What is measured: the tokens the default model routes to each (layer, expert) while it prefills
held-out code (the stdlib files the training never saw, `bench/precision.heldout_windows`), at full
precision in the engine as the server runs it; then, per shard count, each layer's max / mean
tokens per shard under round-robin placement (what the server does today) against EPLB's placement,
with 0 and 1 spare expert slots per shard (spare slots replicate the hottest experts). The layer's
hop waits for its most loaded shard, so max / mean is the slowdown against a perfect split.

    python bench/eplb.py [--windows 32] [--length 256] [--shards 2,4]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.precision import heldout_windows  # noqa: E402
from serve_app.config import EngineConfig, default_model_dir  # noqa: E402
from serve_app.engine.core import EngineCore  # noqa: E402
from serve_app.engine.sampling_params import SamplingParams  # noqa: E402
from serve_app.model import load_model  # noqa: E402
from serve_app.parallel.eplb import balance, imbalance, round_robin  # noqa: E402
from serve_app.tokenizer import CodeTokenizer  # noqa: E402


def routed_load(model_dir: str, windows: int, length: int) -> torch.Tensor:
    """[L, E] tokens routed per (MoE layer, expert) over the held-out windows."""
    model = load_model(model_dir)
    ids = heldout_windows(CodeTokenizer.from_dir(model_dir), windows, length)
    core = EngineCore(model, EngineConfig(max_num_seqs=8, speculative_tokens=0))
    core.runner.track_expert_load()
    params = SamplingParams(max_tokens=1, temperature=0)
    with torch.inference_mode():
        for i, row in enumerate(ids.tolist()):
            core.add_request(f"w{i}", row, params)
        core.run_until_done()
    load = core.runner.take_expert_load()
    return load[list(model.config.moe_layers)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=default_model_dir())
    p.add_argument("--windows", type=int, default=32)
    p.add_argument("--length", type=int, default=256)
    p.add_argument("--shards", default="2,4")
    p.add_argument("--json", help="write the numbers here too")
    args = p.parse_args(argv)
    load = routed_load(args.model, args.windows, args.length)
    layers = list(range(load.shape[0]))
    total = load.sum(dim=1, keepdim=True).clamp_min(1)
    print(f"{args.windows} held-out windows x {args.length} tokens; routed tokens per layer {load.sum(1).tolist()}")
    print("share of a layer's tokens per expert (%):")
    for i, row in enumerate((load / total * 100).tolist()):
        print(f"  layer {i}: " + " ".join(f"{v:5.1f}" for v in row))
    results = {}
    print(f"\n{'shards':>6} {'placement':<22} {'max/mean per layer':<34} {'worst':>6} {'mean':>6}")
    for shards in (int(s) for s in args.shards.split(",")):
        plans = {"round-robin": round_robin(layers, load.shape[1], shards),
                 "eplb": balance(load, layers, shards, 0),
                 "eplb + 1 spare slot": balance(load, layers, shards, 1)}
        for name, plan in plans.items():
            ratio = imbalance(plan.shard_load(load, layers))
            results[f"{shards}/{name}"] = ratio.tolist()
            print(f"{shards:>6} {name:<22} {' '.join(f'{r:.3f}' for r in ratio.tolist()):<34} "
                  f"{ratio.max():6.3f} {ratio.mean():6.3f}")
        print(f"{'':>6} eplb layout (config `placement`): {json.dumps(plans['eplb'].layout())}")
    if args.json:
        Path(args.json).write_text(json.dumps({"load": load.tolist(), "imbalance": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
