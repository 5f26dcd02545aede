"""Weight-only INT8 / INT4 quantization of expert FFNs (issue 5, "Adaptive precision").

Experts are most of an MoE model's bytes, so they are what we shrink: each expert weight is
quantized once, at load time, from the float checkpoint; activations stay in the model dtype.

- INT8: per output channel (row), symmetric, scale = max|w_row| / 127, values in [-127, 127].
- INT4: groups of G along the input dim K, symmetric, scale = max|w_group| / 7.5, values in
  [-8, 7]. Why 7.5: all 16 levels are used and no weight errs by more than half a step (the
  positive max rounds to 7.5 → 8 → clipped to 7, exactly half a step). On Gaussian weights this
  gave 0.095 / 0.103 / 0.111 relative error at G = 32 / 64 / 128, against 0.097 / 0.108 / 0.118
  for the [-7, 7], max/7 grid.
- Why symmetric: FFN weights are centred on zero, so a zero-point buys almost nothing and costs a
  second tensor; the int8 kernel takes scales only. The int4 kernels want (scale, zero) pairs and
  compute (q - 8) * scale + zero on the unsigned code q in [0, 15]: we store q = v + 8 and zero = 0.
- Rows whose K is not a multiple of G are padded with zero columns (and the activations with zero
  columns on the kernel path), so a short last group is just a group with zeros in it.

Two ways to multiply (`QuantLinear.path`): "kernel" — packed-integer matmuls: on a CPU with
AVX512-BF16 or AVX2 + FMA and bf16 activations the project's own W8A16 / W4A16 kernels
(cpu_kernels: `packed` beside the codes; on AVX512-BF16 2-2.5x torch's at 4-16 rows), else torch's (`_weight_int8pack_mm`,
`_weight_int4pack_mm[_for_cpu]`) — or "dequant" — `F.linear` on the float weight rebuilt from the codes. Which is faster depends on the device and the activation dtype, so
`serve_app.model.kernels.quant_path` measures it in this process (bench/quant_kernels.py prints
the same comparison); a kernel missing from this torch build, or unable to take a shape, falls
back to "dequant". `materialize()` caches the rebuilt weight (float memory and float speed with
the quantized numerics): every call uses it on the dequant path (CPUs in float32, where the
kernels lose), calls above `row_limit` rows use it on the kernel path (prefill chunks: the CPU
kernels are GEMVs). Quantized experts: serve_app/model/quant_experts.py; saving and loading:
serve_app/model/quant_io.py.

Not only experts: `precision.quantize_dense` gives every dense linear of the model (q/k/v/o, dense MLPs,
the LM head) a copy per mode, so a fast-lane step reads INT8/INT4 weights only (W8A16 / W4A16).

Legend: R=rows of one expert, D=hidden, F=expert FFN width, N=out features, K=in features,
Kp=K padded to a multiple of G, G=int4 group size, Q=Kp/G groups per row.
"""
from __future__ import annotations

import functools
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from serve_app.model import cpu_kernels
from serve_app.model.kernels import NO_LIMIT, dense_copy_dtype, kernel_row_limit, quant_path

QuantMode = Literal["int8", "int4"]
MODES = ("int8", "int4")
INT4_GROUP_SIZES = (32, 64, 128, 256)  # the only group sizes the CPU and CUDA int4 kernels accept
# 64: on the default expert (D=256, F=512) it is 4 / 8 groups per row. G=32 lowers the error only
# from 0.103 to 0.095 (relative, Gaussian weights) but doubles the scale bytes: a float32 scale per
# group (a (scale, zero) pair on the kernel path) is +12.5% (+25%) over the 4-bit payload at G=64.
DEFAULT_GROUP_SIZE = 64
INT4_SCALE_DIVISOR = 7.5               # see the module docstring

class QuantConfigError(ValueError):
    """An unsupported quantization mode, group size or layout."""


def _check_mode(mode: str, group_size: int) -> None:
    if mode not in MODES:
        raise QuantConfigError(f"quantization mode {mode!r} is not supported; use one of {MODES}")
    if mode == "int4" and group_size not in INT4_GROUP_SIZES:
        raise QuantConfigError(f"int4 group size {group_size} is not supported; use one of {INT4_GROUP_SIZES}")


# --- quantize / pack ------------------------------------------------------------------------------

def quantize_int8(w: torch.Tensor, scale_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] float → (q [N, K] int8 in [-127, 127], scales [N] float32, each a value of
    `scale_dtype`: the codes are rounded against the scales the kernels will multiply with)."""
    w = w.float()
    amax = w.abs().amax(dim=1)                                          # [N]
    scales = torch.where(amax > 0, amax / 127, torch.ones_like(amax)).to(scale_dtype).float()  # all-zero rows stay zero
    q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales


def quantize_int4(w: torch.Tensor, group_size: int,
                  scale_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] float → (v [N, Kp] int8 in [-8, 7], scales [N, Q] float32 values of `scale_dtype`)."""
    n, k = w.shape
    kp = -(-k // group_size) * group_size
    w = F.pad(w.float(), (0, kp - k)).view(n, kp // group_size, group_size)   # [N, Q, G]
    amax = w.abs().amax(dim=-1)                                                # [N, Q]
    scales = torch.where(amax > 0, amax / INT4_SCALE_DIVISOR, torch.ones_like(amax)).to(scale_dtype).float()
    v = torch.round(w / scales[..., None]).clamp(-8, 7).to(torch.int8)        # [N, Q, G]
    return v.view(n, kp), scales


def pack_int4(v: torch.Tensor) -> torch.Tensor:
    """v [N, Kp] in [-8, 7] → [N, Kp/2] uint8, code v+8, even column in the high nibble (the
    byte order torch's CUDA int4 packer takes, so this tensor goes to it unchanged)."""
    u = (v.to(torch.int16) + 8).to(torch.uint8)                         # [N, Kp] in [0, 15]
    return (u[:, 0::2] << 4) | u[:, 1::2]                               # [N, Kp/2]


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """[N, Kp/2] uint8 → v [N, Kp] int8 in [-8, 7]."""
    u = torch.stack([packed >> 4, packed & 0xF], dim=-1)                # [N, Kp/2, 2]
    return (u.view(packed.shape[0], -1).to(torch.int8) - 8)            # [N, Kp]


# --- kernels ----------------------------------------------------------------------------------

def _int4_kernel_ops(device_type: str):
    """(pack, matmul) for this device, or None where this torch build has no int4 kernel."""
    if device_type == "cpu" and hasattr(torch, "_weight_int4pack_mm_for_cpu"):
        return torch._convert_weight_to_int4pack_for_cpu, torch._weight_int4pack_mm_for_cpu
    if device_type == "cuda" and hasattr(torch, "_weight_int4pack_mm"):
        return torch._convert_weight_to_int4pack, torch._weight_int4pack_mm
    return None


def _inner_k_tiles(kp: int) -> int:
    """CUDA tiles K by 16 * innerKTiles (2, 4 or 8); the CPU packer ignores it. Kp % 32 == 0 always."""
    return next(t for t in (8, 4, 2) if kp % (16 * t) == 0)


def _int4_shape_ok(device_type: str, n: int) -> bool:
    return n % (16 if device_type == "cpu" else 8) == 0   # the packers' row-tile sizes


def _int4_act_dtype(device_type: str, dtype: torch.dtype) -> torch.dtype:
    # The CUDA kernel (tinygemm) takes bf16 only; int4 error (~10%) dwarfs bf16 rounding (~0.4%).
    return torch.bfloat16 if device_type == "cuda" else dtype


def scale_dtype(device_type: str, mode: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype whose values a quantized weight's scales are rounded to: the one the torch kernels
    and the dense copies hold them in (the lane's; bf16 for CUDA's int4 kernel). The fused CPU
    kernels take the same values in float32, so a row computes the same whichever path its step's
    row count picks (a decode step, a verification of drafts, a prefill chunk): with float32
    scales beside bf16-rounded ones, a 17-row pass and 17 one-row steps differed in 30% of a
    linear's bf16 outputs (2026-12-04, the bundled model's INT8 and INT4 copies)."""
    return _int4_act_dtype(device_type, dtype) if mode == "int4" else dtype


@functools.lru_cache(maxsize=None)
def _kernel_works(device_type: str, mode: str, dtype: torch.dtype, group_size: int) -> bool:
    """Run the kernel once on a small random weight and compare it with the dequantized matmul:
    the kernels are private aten ops whose dtype support varies by build and device."""
    gen = torch.Generator().manual_seed(0)
    w, x = torch.randn(32, 2 * group_size, generator=gen), torch.randn(4, 2 * group_size, generator=gen)
    try:
        kernel = QuantLinear.from_weight(w, mode, group_size, dtype, device_type, path="kernel")
        plain = QuantLinear.from_weight(w, mode, group_size, dtype, device_type, path="dequant")
        x = x.to(device_type, dtype)
        y, ref = kernel(x).float(), plain(x).float()
    except (RuntimeError, NotImplementedError):
        return False
    # Both paths round the same way in float32; in 16-bit (and int4 on CUDA, which runs in bf16)
    # they round at different places, ~0.5% apart.
    loose = dtype != torch.float32 or (mode == "int4" and device_type == "cuda")
    return bool(((y - ref).norm() / ref.norm()) < (5e-2 if loose else 1e-4))


def choose_path(device_type: str, mode: str, dtype: torch.dtype, group_size: int, out_features: int) -> str:
    """The measured choice (kernels.quant_path); "dequant" where a kernel fails or cannot take the shape."""
    path = quant_path(device_type, mode, dtype)
    if path == "kernel" and mode == "int4" and (_int4_kernel_ops(device_type) is None
                                                 or not _int4_shape_ok(device_type, out_features)):
        return "dequant"
    if path == "kernel" and not _kernel_works(device_type, mode, dtype, group_size):
        return "dequant"
    return path


# --- one quantized weight ---------------------------------------------------------------------

class QuantLinear(nn.Module):
    """A weight [N, K] held as int8 or 4-bit codes; forward(x [R, K]) → [R, N] in x's dtype.

    Buffers by (mode, path) — each path keeps only the layout it multiplies with:
      int8, either path:  qweight int8 [N, K],            scales [N]
      int4, "dequant":    qweight uint8 [N, Kp/2] (pack_int4), scales [N, Q]
      int4, "kernel":     qweight in the device kernel's private layout, scales_and_zeros [Q, N, 2]
    The int4 kernel layout is device-specific, so such a module is built on its device and
    refuses to run after `.to()` elsewhere. Scales are in the activation dtype: the kernels take
    them in the dtype of x.
    """

    def __init__(self, mode: str, in_features: int, out_features: int, group_size: int | None,
                 path: str, device_type: str, row_limit: int = 0):
        super().__init__()
        self.mode, self.path, self.device_type = mode, path, device_type
        # Kernel path: calls with more rows than this multiply the materialized dense copy instead
        # (kernels.kernel_row_limit: the packed CPU kernels are GEMVs, slow for prefill chunks).
        self.row_limit = row_limit
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.padded_in = in_features if mode == "int8" else -(-in_features // group_size) * group_size

    @classmethod
    def from_weight(cls, w: torch.Tensor, mode: str, group_size: int = DEFAULT_GROUP_SIZE,
                    dtype: torch.dtype | None = None, device=None, path: str | None = None,
                    row_limit: int | None = None) -> "QuantLinear":
        """Quantize a float weight [N, K]; dtype/device default to the weight's own."""
        _check_mode(mode, group_size)
        dtype = dtype or w.dtype
        device = torch.device(device if device is not None else w.device)
        held = scale_dtype(device.type, mode, dtype)
        if mode == "int8":
            codes, scales = quantize_int8(w, held)
        else:
            v, scales = quantize_int4(w, group_size, held)
            codes = pack_int4(v)
        return cls.from_codes(codes, scales, mode, w.shape[1], group_size, dtype, device, path, row_limit)

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scales: torch.Tensor, mode: str, in_features: int,
                   group_size: int, dtype: torch.dtype, device, path: str | None = None,
                   row_limit: int | None = None) -> "QuantLinear":
        """From the portable form (`codes()`): int8 [N, K] or pack_int4 [N, Kp/2], and float scales.
        `row_limit`: see __init__ (default: measured for this device, mode and dtype)."""
        _check_mode(mode, group_size)
        device = torch.device(device)
        n = codes.shape[0]
        path = path or choose_path(device.type, mode, dtype, group_size, n)
        if path not in ("kernel", "dequant"):
            raise QuantConfigError(f"path {path!r} is not supported; use 'kernel' or 'dequant'")
        if row_limit is None:
            row_limit = kernel_row_limit(device.type, mode, dtype, n, in_features) if path == "kernel" else 0
        layer = cls(mode, in_features, n, group_size if mode == "int4" else None, path, device.type, row_limit)
        # Every path multiplies with the same scale values (a no-op for scales quantize_* made):
        # the fused kernels take float32 scales, torch's and the dense copies the lane dtype's.
        codes, scales = codes.to(device), scales.to(device).to(scale_dtype(device.type, mode, dtype)).float()
        if mode == "int8" or path == "dequant":
            layer.register_buffer("qweight", codes)
            layer.register_buffer("scales", scales.to(dtype))
            if mode == "int8" and path == "kernel":
                layer._pack_fused(codes, scales, dtype)
            return layer
        ops = _int4_kernel_ops(device.type)
        if ops is None or not _int4_shape_ok(device.type, n):
            raise QuantConfigError(f"no int4 kernel for {n} output rows on {device.type}; use path='dequant'")
        pack, _ = ops
        portable = codes
        if device.type == "cpu":    # the CPU packer takes int32 codes [N, Kp]; CUDA takes pack_int4 bytes
            codes = (unpack_int4(codes).to(torch.int32) + 8)
        layer.register_buffer("qweight", pack(codes.contiguous(), _inner_k_tiles(layer.padded_in)))
        sz = torch.stack([scales.t(), torch.zeros_like(scales.t())], dim=-1)           # [Q, N, 2]
        layer.register_buffer("scales_and_zeros", sz.to(_int4_act_dtype(device.type, dtype)).contiguous())
        if device.type == "cpu":
            layer._pack_fused(portable, scales, dtype)
        return layer

    def _pack_fused(self, codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> None:
        """The fused W8A16 / W4A16 kernels' layout of the codes (cpu_kernels `int8_linear`,
        `int4_linear`, `moe_quant_experts`: AVX512-BF16 or AVX2 + FMA),
        kept beside the torch kernel's buffers as derived data (not saved) where those kernels run:
        bf16 activations on this CPU. codes/scales: the portable form (`codes()`)."""
        fused = cpu_kernels.ops(codes.device.type)
        if dtype != torch.bfloat16 or fused is None or not fused.int8_linear_supported():
            return
        n = codes.shape[0]
        if self.mode == "int8":
            padded = -(-n // 16) * 16
            packed, packed_scales = fused.int8_pack(codes), F.pad(scales.float(), (0, padded - n))  # [N/16, K/2, 16, 2], [N/16*16]
        else:
            packed, packed_scales = fused.int4_pack(unpack_int4(codes)[:, :self.in_features].contiguous(),
                                                    scales.float())          # [N/16, K/2, 16], [N/16, Q, 16]
        self.register_buffer("packed", packed, persistent=False)
        self.register_buffer("packed_scales", packed_scales, persistent=False)

    @property
    def fused_group(self) -> int:
        """How the fused kernels read `packed`: 0 = INT8, else the INT4 group size."""
        return 0 if self.mode == "int8" else self.group_size

    def codes(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The portable form: (int8 [N, K] or pack_int4 [N, Kp/2], float32 scales [N] or [N, Q])."""
        if self.mode == "int8" or self.path == "dequant":
            return self.qweight, self.scales.float()
        # The kernel layout is private to each device's kernel, so read the codes back through the
        # kernel itself: x = I with scale 1, zero 0 gives (q - 8) = v, exact small integers.
        unit = torch.stack([torch.ones_like(self.scales_and_zeros[..., 0]),
                            torch.zeros_like(self.scales_and_zeros[..., 0])], dim=-1)  # [Q, N, 2]
        eye = torch.eye(self.padded_in, dtype=unit.dtype, device=unit.device)          # [Kp, Kp]
        v = _int4_kernel_ops(self.device_type)[1](eye, self.qweight, self.group_size, unit)  # [Kp, N]
        return pack_int4(v.t().round().to(torch.int8)), self.scales_and_zeros[..., 0].t().float()

    @property
    def lane_dtype(self) -> torch.dtype:
        """The activation dtype this module was built for (its scales are kept in it)."""
        return self.scales_and_zeros.dtype if self.mode == "int4" and self.path == "kernel" else self.scales.dtype

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The float weight [N, K] this module multiplies with."""
        packed = self.mode == "int4" and self.path == "kernel"
        codes, scales = self.codes() if packed else (self.qweight, self.scales)
        dtype = dtype or self.lane_dtype
        if self.mode == "int8":
            return codes.to(dtype) * scales.to(dtype)[:, None]                          # [N, K]
        n, q = scales.shape
        v = unpack_int4(codes).to(dtype).view(n, q, self.group_size)                     # [N, Q, G]
        return (v * scales.to(dtype)[..., None]).view(n, -1)[:, :self.in_features]      # [N, K]

    def materialize(self) -> None:
        """Keep the dequantized weight: float speed and float memory, with the quantized numerics.
        Dequant path: for devices whose integer kernels lose to a float matmul (CPUs in float32),
        where dequantizing on every call would make the fast path the slow one. Kernel path: for
        calls above `row_limit` rows (prefill chunks), where a GEMM beats the GEMV-shaped kernel."""
        if self.path == "dequant" or self.row_limit < NO_LIMIT:
            dense = self.dequantize(dense_copy_dtype(self.device_type, self.lane_dtype))
            self.register_buffer("dense", dense, persistent=False)                      # [N, K]

    def _dense_linear(self, x: torch.Tensor) -> torch.Tensor:
        w = self.dense
        if w.dtype == x.dtype:
            return F.linear(x, w)
        if w.dtype == torch.float32:          # 16-bit activations where float32 GEMMs are faster
            return F.linear(x.float(), w).to(x.dtype)
        return F.linear(x, w.to(x.dtype))

    def forward(self, x: torch.Tensor, packed: bool = False) -> torch.Tensor:
        """x [..., K] → [..., N]. `packed`: the kernel path multiplies with the packed kernel at any
        row count (precision.RowPrecision.packed), not with the dense copy above row_limit."""
        if (self.path == "kernel" and not packed and x.numel() > self.row_limit * self.in_features
                and "dense" in self._buffers):
            return self._dense_linear(x)
        if self.path == "dequant":
            if "dense" in self._buffers:
                return self._dense_linear(x)
            return F.linear(x, self.dequantize(x.dtype))                                # [R, N]
        if x.dim() != 2:                                  # the kernels take [R, K] only
            return self.forward(x.reshape(-1, x.shape[-1]), packed).view(*x.shape[:-1], self.out_features)
        if self.mode == "int8":
            packed = self._buffers.get("packed")
            if packed is not None and (fused := cpu_kernels.for_tensor(x)) is not None:
                return fused.int8_linear(x, packed, self.packed_scales, self.out_features)
            # Even a no-op .to costs ~1 µs of dispatch, 33 times a decode step.
            scales = self.scales if self.scales.dtype == x.dtype else self.scales.to(x.dtype)
            return torch._weight_int8pack_mm(x.contiguous(), self.qweight, scales)
        packed = self._buffers.get("packed")
        if packed is not None and (fused := cpu_kernels.for_tensor(x)) is not None:
            return fused.int4_linear(x, packed, self.packed_scales, self.out_features, self.group_size)
        if self.qweight.device.type != self.device_type:
            raise QuantConfigError(f"int4 weights were packed for {self.device_type}, now on "
                                   f"{self.qweight.device.type}; quantize again on the target device")
        act = self.scales_and_zeros.dtype
        if self.padded_in != self.in_features:
            x = F.pad(x, (0, self.padded_in - self.in_features))                         # [R, Kp]
        xp = (x if x.dtype == act else x.to(act)).contiguous()
        mm = _int4_kernel_ops(self.device_type)[1]
        y = mm(xp, self.qweight, self.group_size, self.scales_and_zeros)                 # [R, N]
        return y if y.dtype == x.dtype else y.to(x.dtype)

    def nbytes(self) -> int:
        """Stored bytes (codes, scales): a materialized dense copy is a cache, not counted here."""
        return sum(b.numel() * b.element_size() for b in self.state_dict().values())

    def extra_repr(self) -> str:
        return (f"{self.mode}, in={self.in_features}, out={self.out_features}, "
                f"group={self.group_size}, path={self.path}")


def wants_dense_copy(materialize: bool | str, device_type: str) -> bool:
    """AppConfig.quant_materialize for weights on `device_type`: "auto" = on CPU, never on GPUs."""
    return device_type == "cpu" if materialize == "auto" else bool(materialize)
