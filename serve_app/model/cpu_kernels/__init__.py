"""The fused CPU decode kernels (ops.cpp and its fragments), compiled on first use and cached on disk.

`ops()` returns the `torch.ops.moe_serve` namespace once the extension is built and loaded, or
None where it cannot be: no C++ compiler or ninja, a build error, a non-CPU device, or
`MOE_SERVE_CPU_KERNELS=0`. None is never an error: the model then runs its pure-torch path,
which is also the reference the kernels are tested against.

Why compiled here and not shipped as a wheel: the project installs with `pip install -e .` on
the machine that serves, and the kernels are built for that machine's CPU (`-march=native`:
AVX-512 and AVX512-BF16 on a Zen 4, AVX2 + FMA on a Zen 3, portable loops below that). The build (~40 s on two cores) happens once, in `make
install` (`python -m serve_app.model.cpu_kernels`) or at the first model load; the .so is cached
under `$MOE_SERVE_KERNEL_CACHE` (default `~/.cache/moe-serve/kernels`), keyed by the sources'
hash and folder, torch's version and the CPU flags, and every later process only loads it (~10 ms).
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import sys
import threading
from pathlib import Path

import torch

log = logging.getLogger(__name__)
HERE = Path(__file__).parent
SOURCES = [HERE / name for name in ("ops.cpp", "attention.cpp", "pointwise.cpp", "quant_gemm.cpp", "moe.cpp")]
HEADERS = [HERE / name for name in ("common.h", "quant_gemm_amx.h")]
_lock = threading.Lock()


def enabled() -> bool:
    return os.environ.get("MOE_SERVE_CPU_KERNELS", "1") not in ("0", "false", "off")


def march() -> str:
    """The -march the kernels are compiled for: this CPU by default; `MOE_SERVE_KERNEL_MARCH`
    (e.g. x86-64-v3, an AVX2 machine; x86-64-v2, without AVX) builds another CPU's paths, as the
    tests do."""
    return os.environ.get("MOE_SERVE_KERNEL_MARCH", "native")


def _build_dir() -> Path:
    from serve_app.model.kernels import cpu_features
    code = b"".join(p.read_bytes() for p in [*SOURCES, *HEADERS]) + march().encode()
    # The source folder too: ninja's build file names the sources by path, so two checkouts
    # sharing one build folder would rebuild each other's library on every load.
    key = hashlib.sha256(code + str(HERE).encode() + torch.__version__.encode()
                         + " ".join(cpu_features()).encode()).hexdigest()[:16]
    root = Path(os.environ.get("MOE_SERVE_KERNEL_CACHE", Path.home() / ".cache" / "moe-serve" / "kernels"))
    return root / key


@functools.lru_cache(maxsize=1)
def _load():
    if not enabled():
        return None
    with _lock:
        try:
            from torch.utils.cpp_extension import load
            bin_dir = str(Path(sys.executable).parent)             # the venv's ninja
            if bin_dir not in os.environ.get("PATH", "").split(os.pathsep):
                os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")
            if shutil.which("ninja") is None or shutil.which(os.environ.get("CXX", "c++")) is None:
                log.warning("moe-serve CPU kernels disabled: no ninja or C++ compiler on PATH")
                return None
            build = _build_dir()
            build.mkdir(parents=True, exist_ok=True)
            load(name="moe_serve_decode", sources=[str(p) for p in SOURCES], build_directory=str(build),
                 extra_cflags=["-O3", f"-march={march()}", "-fopenmp-simd", "-fno-math-errno"],
                 is_python_module=False, verbose=False)
        except Exception as exc:                     # noqa: BLE001 - any build failure means: run without
            log.warning("moe-serve CPU kernels disabled: build failed: %s", str(exc).splitlines()[-1:])
            return None
    return torch.ops.moe_serve


_off = False      # set by `disabled()`


def ops(device_type: str = "cpu"):
    """torch.ops.moe_serve on CPU when the kernels are built and enabled, else None."""
    return _load() if device_type == "cpu" and not _off else None


def for_tensor(x: torch.Tensor):
    """The kernels if they apply to a step on `x`, else None. They apply to 16-bit activations on
    CPU outside autograd (inference): float32 steps are the parity lane and keep the torch path,
    training needs gradients, which these kernels do not have. (Called ~35 times a decode step,
    so the cheapest checks come first and `is_cpu` stands in for `device.type`.)"""
    if _off or x.dtype is torch.float32 or not x.is_cpu or torch.is_grad_enabled():
        return None
    return _load()


class disabled:
    """`with cpu_kernels.disabled():` runs the pure-torch path (the reference, in tests and benches)."""

    def __enter__(self):
        global _off
        self._was, _off = _off, True

    def __exit__(self, *exc):
        global _off
        _off = self._was

