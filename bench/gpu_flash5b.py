"""Decode on a GPU at the flash-5b shape (DESIGN.md §1): our engine against transformers `generate`
on the same card, next to the HBM floor measured in the same run.

What is measured, at batch 1 (one editor) and batch 8, bf16, greedy, `--new` tokens after a
`--prompt`-token prompt of random ids:
- ours: `EngineCore.step()` per token (prefill excluded: the median step after the first token),
  every expert local on this GPU, speculative decoding off (the plain decode step; no CUDA graphs
  or torch.compile yet: this run is what decides whether they pay);
- transformers: `generate(max_new_tokens=N)` minus `generate(max_new_tokens=1)` (its prefill), per
  token, same weights (the checkpoint is built with transformers and loaded by both);
- the floor: the bytes one decode token must read (dense weights, LM head and top-k of the
  experts per layer, bf16) over the bandwidth of one device-to-device copy of 4 GiB.
An earlier measurement on an H200: transformers 42.6 ms per step at batch 1, floor 0.75 ms.

    python bench/gpu_flash5b.py [--dir /tmp/flash5b] [--prompt 512] [--new 64]     # on a CUDA machine
    python bench/gpu_flash5b.py --tiny --device cpu                               # a smoke run of the script
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

from serve_app.config import EngineConfig  # noqa: E402
from serve_app.engine import EngineCore, SamplingParams  # noqa: E402
from serve_app.model import load_model  # noqa: E402

FLASH_5B = dict(vocab_size=32000, hidden_size=2048, num_hidden_layers=24, num_attention_heads=16,
                num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2, intermediate_size=4096,
                max_position_embeddings=4096)
TINY = dict(FLASH_5B, hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=256, vocab_size=1000)


def build(out: Path, shape: dict) -> None:
    if (out / "config.json").is_file():
        return
    import transformers as tf
    torch.manual_seed(0)
    model = tf.MixtralForCausalLM(tf.MixtralConfig(**shape, torch_dtype="bfloat16")).to(torch.bfloat16)
    model.save_pretrained(out)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def floor_ms(shape: dict, device: str) -> tuple[float, float]:
    """(ms per decode token at the copy bandwidth, that bandwidth in GB/s)."""
    d, f, layers = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    kv = shape["num_key_value_heads"] * d // shape["num_attention_heads"]
    per_layer = d * (2 * d + 2 * kv) + shape["num_experts_per_tok"] * 3 * d * f + shape["num_local_experts"] * d
    weights = 2 * (layers * per_layer + 2 * shape["vocab_size"] * d)          # bf16, embedding row ~0
    n = (4 << 30) // 2 if device == "cuda" else (256 << 20) // 2
    src = torch.empty(n, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    sync(device)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - t)
    gbs = 2 * n * 2 / best / 1e9                                                # read + write
    return weights / (gbs * 1e9) * 1e3, gbs


def ours(path: Path, device: str, batch: int, prompt: int, new: int) -> float:
    model = load_model(path, dtype=torch.bfloat16, device=device)
    cfg = EngineConfig(num_kv_blocks=max(64, batch * (prompt + new) // 16 + 8), max_num_seqs=batch,
                       max_num_batched_tokens=max(512, prompt), long_prefill_chunk=max(512, prompt),
                       speculative_tokens=0)
    engine = EngineCore(model, cfg)
    gen = torch.Generator().manual_seed(1)
    for b in range(batch):
        ids = torch.randint(1, model.config.vocab_size, (prompt,), generator=gen).tolist()
        engine.add_request(f"r{b}", ids, SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True))
    times = []
    while engine.has_unfinished():
        sync(device)
        t = time.perf_counter()
        engine.step()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times[batch + 1:]) * 1e3                          # after every prefill


def transformers_ms(path: Path, device: str, batch: int, prompt: int, new: int) -> float:
    import transformers as tf
    model = tf.MixtralForCausalLM.from_pretrained(path, torch_dtype=torch.bfloat16).to(device).eval()
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, model.config.vocab_size, (batch, prompt), generator=gen).to(device)

    def run(n: int) -> float:
        sync(device)
        t = time.perf_counter()
        with torch.inference_mode():
            model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        sync(device)
        return time.perf_counter() - t
    run(2)                                                                       # warm-up
    return (statistics.median(run(new) for _ in range(3)) - statistics.median(run(1) for _ in range(3))) \
        / (new - 1) * 1e3


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", type=Path, default=Path("/tmp/flash5b"))
    p.add_argument("--device", default="cuda")
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--batches", default="1,8")
    p.add_argument("--tiny", action="store_true", help="a small model of the same layout (smoke run)")
    args = p.parse_args()
    shape = TINY if args.tiny else FLASH_5B
    path = args.dir.with_name(args.dir.name + "-tiny") if args.tiny else args.dir
    build(path, shape)
    floor, gbs = floor_ms(shape, args.device)
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"{name}; {'tiny' if args.tiny else 'flash-5b'} shape; prompt {args.prompt}, {args.new} new tokens, "
          f"bf16, greedy; copy bandwidth {gbs:.0f} GB/s -> floor {floor:.3f} ms per token at batch 1")
    print(f"{'batch':>5}{'ours ms/step':>14}{'transformers ms/step':>22}{'ours / floor':>14}")
    for batch in (int(b) for b in args.batches.split(",")):
        a = ours(path, args.device, batch, args.prompt, args.new)
        b = transformers_ms(path, args.device, batch, args.prompt, args.new)
        print(f"{batch:>5}{a:>14.2f}{b:>22.2f}{a / floor:>14.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
