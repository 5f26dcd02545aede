"""Adaptive precision, measured: quality and speed of INT8/INT4 experts against full precision.

Quality, on held-out code (CPython stdlib files the default model never trained on): for each
precision, next-token argmax agreement with the full-precision model and perplexity, over the same
windows. Speed: engine decode step time and tokens/s at batch 1 and 16 per precision, full
precision measured in the same run as the peer. Only the experts are quantized (the dense layers,
attention and gates stay in float), exactly as the router serves the fast path.

    python -m bench.precision [--model DIR] [--windows 24] [--quick]
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from serve_app.config import EngineConfig, default_model_dir
from serve_app.engine import EngineCore, SamplingParams
from serve_app.model import load_model
from serve_app.model.quant import quantized_copies
from serve_app.tokenizer import CodeTokenizer

PRECISIONS = ("full", "int8", "int4")


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


def with_backends(model, group_size: int, materialize) -> dict[str, object]:
    """The quantized copies exactly as the router builds them (quantized_copies)."""
    backends = {"full": model.local_experts, **quantized_copies(model.local_experts, ("int8", "int4"), group_size,
                                                                materialize)}
    for mode in ("int8", "int4"):
        model.set_expert_backend(backends[mode], mode)
    return backends


@torch.inference_mode()
def quality(model, backends: dict, windows: torch.Tensor, batch: int = 4) -> dict[str, dict]:
    logits_by = {}
    for precision in PRECISIONS:
        model.set_expert_backend(backends[precision])           # route every row to this precision
        logits_by[precision] = torch.cat([model(windows[i:i + batch]) for i in range(0, len(windows), batch)])
    model.set_expert_backend(None)
    targets = windows[:, 1:]
    ref_argmax = logits_by["full"][:, :-1].argmax(-1)
    out = {}
    for precision, logits in logits_by.items():
        lp = torch.log_softmax(logits[:, :-1].float(), -1)
        nll = -lp.gather(-1, targets[..., None]).mean().item()
        agree = (logits[:, :-1].argmax(-1) == ref_argmax).float().mean().item()
        out[precision] = {"agreement": agree, "perplexity": float(torch.exp(torch.tensor(nll)))}
    return out


def decode_speed(model, tokenizer, precision: str, batch: int, new_tokens: int, prompt_len: int = 64) -> dict:
    cfg = EngineConfig(num_kv_blocks=max(64, batch * (prompt_len + new_tokens) // 16 + batch * 2),
                       max_num_seqs=batch, max_num_batched_tokens=max(512, batch * prompt_len))
    engine = EngineCore(model, cfg, tokenizer)
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    gen = torch.Generator().manual_seed(batch)
    for i in range(batch):
        prompt = torch.randint(10, model.config.vocab_size, (prompt_len,), generator=gen).tolist()
        engine.add_request(f"r{i}", prompt, params,
                           precision=precision)
    step_times = []
    while engine.has_unfinished():
        started = time.perf_counter()
        engine.step()
        if engine.last_step.num_batched_tokens == batch:        # a pure decode step of the whole batch
            step_times.append(time.perf_counter() - started)
    median = statistics.median(step_times)
    return {"step_ms": median * 1e3, "tokens_per_s": batch / median}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=default_model_dir())
    ap.add_argument("--windows", type=int, default=24)
    ap.add_argument("--window-len", type=int, default=256)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--quick", action="store_true", help="fewer windows and tokens (smoke run)")
    ap.add_argument("--no-materialize", action="store_true",
                    help="dequantize on every call (the memory-saving path) instead of the router's default")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    model_dir = Path(args.model)
    model, tokenizer = load_model(model_dir), CodeTokenizer.from_dir(model_dir)
    backends = with_backends(model, args.group_size, False if args.no_materialize else "auto")
    windows = heldout_windows(tokenizer, 4 if args.quick else args.windows, args.window_len)
    q = quality(model, backends, windows)
    new_tokens = 8 if args.quick else 32
    speed = {(p, b): decode_speed(model, tokenizer, p, b, new_tokens) for p in PRECISIONS for b in (1, 16)}
    mb = {p: (backends[p].bytes_per_expert() if p != "full" else
              sum(t.numel() * t.element_size() for t in model.local_experts.ffn["0_0"].parameters()))
          for p in PRECISIONS}
    print(f"model {model_dir}  windows {len(windows)}x{args.window_len}  int4 group {args.group_size}  "
          f"threads {torch.get_num_threads()}")
    print(f"{'precision':>9} {'agree':>7} {'ppl':>8} {'KB/expert':>10} {'b1 ms':>7} {'b1 tok/s':>9} "
          f"{'b16 ms':>7} {'b16 tok/s':>9} {'b16 speedup':>11}")
    for p in PRECISIONS:
        s1, s16 = speed[(p, 1)], speed[(p, 16)]
        print(f"{p:>9} {q[p]['agreement']:>7.1%} {q[p]['perplexity']:>8.3f} {mb[p] / 1024:>10.1f} "
              f"{s1['step_ms']:>7.2f} {s1['tokens_per_s']:>9.1f} {s16['step_ms']:>7.2f} {s16['tokens_per_s']:>9.1f} "
              f"{s16['tokens_per_s'] / speed[('full', 16)]['tokens_per_s']:>10.2f}x")


if __name__ == "__main__":
    main()
