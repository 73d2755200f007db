"""What the machine decides: the device ``--device`` names, the autocast dtype ``train.dtype="auto"``
resolves to, and the matmul FLOP/s that MFU is measured against. A run records the dtype it resolved
at its first start and never probes again (`engram.train.resume`): timings vary, and a resumed run
must compute the same way.
"""

from __future__ import annotations

import re
import time

import torch

from engram.config import UserError

_PEAK_FLOPS: dict = {}
DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"


def resolve_device(spec: str | None = "auto") -> torch.device:
    """The concrete device ``--device`` names: ``"auto"`` is the current CUDA device where torch sees one,
    else the CPU; ``"cuda"``/``"cuda:N"`` must exist here. Always an indexed CUDA device (``cuda:0``, not
    ``cuda``), so the run directory records which card ran it. A UserError names what is wrong (no CUDA
    at all, an index past the device count, a spelling that names no device) before any work.
    """
    text = (spec or "auto").strip().lower()
    if text == "cpu":
        return torch.device("cpu")
    if text == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    m = re.fullmatch(r"cuda(?::(\d+))?", text)
    if m is None:
        raise UserError(f"--device {spec!r}: expected {DEVICE_CHOICES}")
    if not torch.cuda.is_available():
        built = f"built with CUDA {torch.version.cuda}" if torch.version.cuda else "built without CUDA"
        raise UserError(f"--device {spec}: torch {torch.__version__} ({built}) sees no CUDA device on this machine; "
                        f"use --device cpu (or auto)")
    n = torch.cuda.device_count()
    index = torch.cuda.current_device() if m[1] is None else int(m[1])
    if index >= n:
        raise UserError(f"--device {spec}: this machine has {n} CUDA device{'s' if n != 1 else ''} "
                        f"(cuda:0 to cuda:{n - 1})")
    return torch.device("cuda", index)


def peak_flops(dtype: torch.dtype) -> float:
    """Measured matmul FLOP/s of this machine for `dtype` (the MFU denominator), cached."""
    if dtype not in _PEAK_FLOPS:
        n = 1024
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        a @ b
        t0 = time.perf_counter()
        reps = 4
        for _ in range(reps):
            a @ b
        _PEAK_FLOPS[dtype] = 2 * n**3 * reps / (time.perf_counter() - t0)
    return _PEAK_FLOPS[dtype]


def resolve_dtype(name: str, device: torch.device | str = "cpu") -> str:
    """The concrete autocast dtype for ``train.dtype``: ``"auto"`` becomes ``"bfloat16"`` where bf16
    matmuls beat fp32 on ``device`` (CUDA with bf16 support; a CPU with native bf16 instructions),
    else ``"float32"``. On CPUs without them (AVX2-only x86, for one) oneDNN emulates bf16 and a
    matmul runs ~50-100x slower than in fp32, so asking for bf16 blindly can turn minutes into hours.
    """
    if name != "auto":
        return name
    device = torch.device(device)
    if device.type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    if device.type != "cpu":
        return "float32"
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(256, 256, generator=g), torch.randn(256, 256, generator=g)

    def best_time(x: torch.Tensor, y: torch.Tensor) -> float:
        x @ y  # warm-up: first calls pick and JIT kernels
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            x @ y
            times.append(time.perf_counter() - t0)
        return min(times)

    t32 = best_time(a, b)
    t16 = best_time(a.bfloat16(), b.bfloat16())
    return "bfloat16" if t16 < t32 else "float32"
