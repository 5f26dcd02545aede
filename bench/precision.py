"""Adaptive precision, measured: quality and speed of the served lanes against float32.

Quality, on held-out code (CPython stdlib files the default model never trained on): for each
lane exactly as the server builds it — full precision in the checkpoint's dtype, INT8 and INT4 with
every linear quantized and activations in the fast lane's dtype (bf16 where the packed kernels
win) — next-token argmax agreement with the float32 model (the parity mode) and perplexity, over
the same windows. Speed: the engine's decode step at batch 1 and 16 per lane, the lanes
interleaved round by round (bench/decode_step.py's `run_lane`: the real kernels, not dequantized
copies), with float32 full precision measured in the same run as the peer.

    python -m bench.precision [--model DIR] [--windows 24] [--quick]
"""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from bench.decode_step import run_lane
from serve_app.config import AppConfig, default_model_dir
from serve_app.embedded import load_served_model
from serve_app.model import load_model
from serve_app.tokenizer import CodeTokenizer

LANES = ("float32", "full", "int8", "int4")     # float32: the parity model; the rest as served


def heldout_windows(tokenizer: CodeTokenizer, num: int, length: int) -> torch.Tensor:
    """[num, length] token windows cut from the held-out stdlib files, in a fixed order."""
    from serve_app.train.corpus import load_split

    ids: list[int] = []
    for file in sorted(load_split().heldout, key=lambda f: f.rel_name):
        ids += tokenizer.encode(file.text)
        if len(ids) >= num * length:
            break
    usable = len(ids) // length
    return torch.tensor(ids[: min(num, usable) * length]).view(-1, length)


def served_model(model_dir: Path, group_size: int):
    """The model as the server builds it: checkpoint dtype, quantized lanes in the fast dtype."""
    return load_served_model(AppConfig(model=str(model_dir), int4_group_size=group_size))


@torch.inference_mode()
def quality(reference, served, windows: torch.Tensor, batch: int = 4) -> dict[str, dict]:
    """Per lane: argmax agreement with the float32 reference and perplexity on `windows` [W, S]."""
    def logits(model, precision: str = "full") -> torch.Tensor:
        return torch.cat([model(windows[i:i + batch], precision).float() for i in range(0, len(windows), batch)])
    logits_by = {"float32": logits(reference), **{p: logits(served, p) for p in ("full", "int8", "int4")}}
    targets = windows[:, 1:]
    ref_argmax = logits_by["float32"][:, :-1].argmax(-1)
    out = {}
    for lane, lg in logits_by.items():
        lp = torch.log_softmax(lg[:, :-1], -1)
        nll = -lp.gather(-1, targets[..., None]).mean().item()
        agree = (lg[:, :-1].argmax(-1) == ref_argmax).float().mean().item()
        out[lane] = {"agreement": agree, "perplexity": float(torch.exp(torch.tensor(nll)))}
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=default_model_dir())
    ap.add_argument("--windows", type=int, default=24)
    ap.add_argument("--window-len", type=int, default=256)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="fewer windows and steps (smoke run)")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    model_dir = Path(args.model)
    reference, served = load_model(model_dir, dtype="float32"), served_model(model_dir, args.group_size)
    tokenizer = CodeTokenizer.from_dir(model_dir)
    windows = heldout_windows(tokenizer, 4 if args.quick else args.windows, args.window_len)
    q = quality(reference, served, windows)
    steps, rounds = (8, 1) if args.quick else (24, args.rounds)
    lanes = {"float32": (reference, "full", None), "full": (served, "full", None),
             "int8": (served, "int8", served.reduced_dtype), "int4": (served, "int4", served.reduced_dtype)}
    times: dict[tuple[str, int], list[float]] = {}
    with torch.inference_mode():
        for _ in range(rounds):                       # interleaved: a burst of load hits every lane alike
            for batch in (1, 16):
                for lane, (model, precision, dtype) in lanes.items():
                    t, _ = run_lane(model, precision, batch, 256, steps, dtype)
                    times.setdefault((lane, batch), []).append(t)
    step = {k: statistics.median(v) for k, v in times.items()}
    dtypes = {"float32": "float32", "full": str(served.embed_tokens.weight.dtype),
              "int8": str(served.reduced_dtype), "int4": str(served.reduced_dtype)}
    print(f"model {model_dir}  windows {len(windows)}x{args.window_len}  int4 group {args.group_size}  "
          f"threads {torch.get_num_threads()}")
    print(f"{'lane':>8} {'dtype':>15} {'agree':>7} {'ppl':>8} {'b1 ms':>7} {'b16 ms':>7} {'b16 tok/s':>9} "
          f"{'vs float32':>10}")
    for lane in LANES:
        print(f"{lane:>8} {dtypes[lane].removeprefix('torch.'):>15} {q[lane]['agreement']:>7.1%} "
              f"{q[lane]['perplexity']:>8.3f} {step[(lane, 1)] * 1e3:>7.2f} {step[(lane, 16)] * 1e3:>7.2f} "
              f"{16 / step[(lane, 16)]:>9.1f} {step[('float32', 16)] / step[(lane, 16)]:>9.2f}x")


if __name__ == "__main__":
    main()
