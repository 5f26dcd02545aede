"""Expert FFN forward time: float vs INT8 / INT4 weights, packed kernel vs dequantize-then-matmul.

What is measured: one `forward(x [R, D])` of a SwiGLU expert (fused gate_up [2F, D], down [D, F])
for R = 1, 8, 32, 128 rows, in microseconds (median over interleaved rounds, so a burst of load on
a shared machine hits every method alike). Methods:

- float:         ExpertFFN, F.linear on float weights. This is also "dequant, cached": a cached
                 (materialized) dequantized weight is a float weight, so it runs exactly this
                 code — what the server multiplies prefill chunks with;
- int8 kernel:   the packed path as the server runs it: on a CPU with AVX512-BF16 and bf16
                 activations the fused W8A16 kernel (serve_app/model/cpu_kernels), else torch's;
- int8 torch:    the same module with the fused kernels off: torch._weight_int8pack_mm;
- int8 dequant:  int8 → float weight on every call, then F.linear;
- int4 kernel:   as int8 kernel (the fused W4A16 kernel where it runs);
- int4 torch:    torch._weight_int4pack_mm_for_cpu (CPU) / _weight_int4pack_mm (CUDA);
- int4 dequant:  unpack nibbles → float weight on every call, then F.linear.

Every quantized method's output is checked against the float one (relative error printed), and
the kernel against the dequant path of the same mode. Last, the choices serve_app/model/kernels.py
measures at start-up on this machine (activation dtype per lane, kernel or dense per mode and
dtype, the row count up to which the kernel wins, the attention dtype), next to the CPU features
read from /proc/cpuinfo: the table above is the evidence for them.

    python bench/quant_kernels.py [--device cpu] [--dtypes float32,bfloat16] [--group-size 64] [--threads 1]
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

from serve_app.model import cpu_kernels, kernels  # noqa: E402
from serve_app.model.moe import ExpertFFN  # noqa: E402
from serve_app.model.quant import DEFAULT_GROUP_SIZE  # noqa: E402
from serve_app.model.quant_experts import QuantizedExpertFFN  # noqa: E402

ROWS = (1, 8, 32, 128)
SHAPES = ((192, 384), (256, 512))  # (D, F): the default model's expert and a wider one
METHODS = ("float", "int8 kernel", "int8 torch", "int8 dequant", "int4 kernel", "int4 torch", "int4 dequant")


class TorchKernels:
    """A module run with the fused CPU kernels off (torch's packed kernels)."""

    def __init__(self, module):
        self.module = module

    def __call__(self, x):
        with cpu_kernels.disabled():
            return self.module(x)

    def nbytes(self) -> int:
        return self.module.nbytes()


def build(hidden: int, width: int, dtype: torch.dtype, device: str, group_size: int) -> dict:
    torch.manual_seed(0)
    ffn = ExpertFFN(hidden, width, dtype=torch.float32, device=device)
    torch.nn.init.normal_(ffn.gate_up, std=0.08)
    torch.nn.init.normal_(ffn.down, std=0.08)
    ffn = ffn.to(dtype).requires_grad_(False)
    methods = {"float": ffn}
    for mode in ("int8", "int4"):
        for path in ("kernel", "dequant"):
            methods[f"{mode} {path}"] = QuantizedExpertFFN.from_float(ffn, mode, group_size, path=path)
        methods[f"{mode} torch"] = TorchKernels(methods[f"{mode} kernel"])
    return methods


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_methods(methods: dict, x: torch.Tensor, rounds: int, inner: int) -> dict[str, float]:
    """Median µs per call of each method, interleaved round by round."""
    device = x.device.type
    samples: dict[str, list[float]] = {name: [] for name in methods}
    with torch.inference_mode():
        for fn in methods.values():
            fn(x)                                  # warm-up: first-call allocations, kernel loads
        for _ in range(rounds):
            for name, fn in methods.items():
                _sync(device)
                start = time.perf_counter()
                for _ in range(inner):
                    fn(x)
                _sync(device)
                samples[name].append((time.perf_counter() - start) / inner * 1e6)
    return {name: statistics.median(s) for name, s in samples.items()}


def check(methods: dict, x: torch.Tensor) -> dict[str, float]:
    """Relative error of each method against float, and of each kernel against its dequant path."""
    with torch.inference_mode():
        outs = {name: fn(x).float() for name, fn in methods.items()}
    rel = {name: float((y - outs["float"]).norm() / outs["float"].norm()) for name, y in outs.items()}
    for mode in ("int8", "int4"):
        k, d = outs[f"{mode} kernel"], outs[f"{mode} dequant"]
        rel[f"{mode} kernel vs dequant"] = float((k - d).norm() / d.norm())
    return rel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--group-size", type=int, default=DEFAULT_GROUP_SIZE)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--inner", type=int, default=10)
    # 1 by default: on a shared, oversubscribed machine a multi-threaded matmul waits for its
    # slowest thread, which turns other people's load into 10× noise.
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, device {args.device}, threads {torch.get_num_threads()}, "
          f"int4 group {args.group_size}")
    lines = []
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        for hidden, width in SHAPES:
            methods = build(hidden, width, dtype, args.device, args.group_size)
            gen = torch.Generator().manual_seed(1)
            rel = check(methods, torch.randn(32, hidden, generator=gen).to(args.device, dtype))
            print(f"{dtype_name} D={hidden} F={width}: rel. error vs float " +
                  ", ".join(f"{k} {v:.4f}" for k, v in rel.items() if k != "float"))
            nbytes = {"float": sum(p.numel() * p.element_size() for p in methods["float"].parameters())}
            nbytes.update({m: methods[m].nbytes() for m in METHODS[1:]})
            print("  bytes per expert: " + ", ".join(f"{k} {v}" for k, v in nbytes.items()))
            for rows in ROWS:
                x = torch.randn(rows, hidden, generator=gen).to(args.device, dtype)
                t = time_methods(methods, x, args.rounds, args.inner)
                lines.append(f"| {dtype_name:8} | {hidden:3} | {width:3} | {rows:4} | " +
                             " | ".join(f"{t[m]:12.1f}" for m in METHODS) + " |")
    print("\nexpert FFN forward, µs per call (median)")
    print("| dtype    |   D |   F |    R | " + " | ".join(f"{m:>12}" for m in METHODS) + " |")
    print("|" + "---|" * (4 + len(METHODS)))
    print("\n".join(lines))
    print_choices()


def print_choices() -> None:
    print(f"\nCPU features: {' '.join(kernels.cpu_features()) or '(none read)'}; "
          f"torch capability {torch.backends.cpu.get_cpu_capability()}")
    fast = kernels.fast_lane_dtype("cpu")
    print(f"measured choices: fast lane dtype {fast}; full precision of a bf16 checkpoint "
          f"{kernels.full_precision_dtype('cpu', torch.bfloat16)}; SDPA in {kernels.attention_dtype('cpu', fast)} "
          f"for {fast} activations; fused CPU kernels "
          f"{'on' if cpu_kernels.ops() is not None else 'unavailable'} (decode attention, W8A16/W4A16 "
          f"{'on, ' + cpu_kernels.ops().quant_gemm_isa() if cpu_kernels.ops() is not None and cpu_kernels.ops().int8_linear_supported() else 'off'})")
    for dtype in (torch.float32, torch.bfloat16):
        for mode in ("int8", "int4"):
            print(f"  {mode} at {dtype}: {kernels.quant_path('cpu', mode, dtype)}, kernel up to "
                  f"{kernels.kernel_row_limit('cpu', mode, dtype)} rows, dense copy above")
    t1, t64 = kernels.time_linears(1), kernels.time_linears(1, weights=64, inner=2)
    print(f"  768x192 at 1 row, µs (7 MB / 38 MB of float32 weights cycled): float32 {t1.float32:.1f} / "
          f"{t64.float32:.1f}, bf16 {t1.bfloat16:.1f} / {t64.bfloat16:.1f}, int8 kernel bf16 "
          f"{t1.int8_kernel_bf16:.1f} / {t64.int8_kernel_bf16:.1f}, int8 kernel float32 "
          f"{t1.int8_kernel_f32:.1f} / {t64.int8_kernel_f32:.1f}")


if __name__ == "__main__":
    main()
