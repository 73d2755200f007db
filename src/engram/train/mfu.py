"""The peak FLOP/s that model FLOPs utilisation (MFU) is measured against.

On a CPU the peak is measured (`engram.train.probe.peak_flops`): CPUs vary too much for a table. On
an NVIDIA GPU it is the vendor's dense peak for the matmul precision the run uses, looked up by the
name ``torch.cuda.get_device_name()`` reports: timing a matmul there would measure the kernel, not the
card. A GPU missing from the table gets no MFU, with the reason, rather than a figure guessed from a
neighbour (an RTX 4090 D or a laptop RTX 4090 is not an RTX 4090).

Datasheets quote tensor-core rates "with sparsity" (2:4 structured); the dense rate, the one a
training step can reach, is half of that and is what the table holds, in TFLOP/s.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PeakRate:
    """``flops``: peak FLOP/s (None: unknown, and then no MFU); ``basis``: where it comes from, or why
    there is none, in words a run's summary can record."""

    flops: float | None
    basis: str


# (pattern on the upper-cased device name, table name, dense TFLOP/s for bf16 / tf32 / fp32).
# First match wins, so a variant comes before its family; patterns end where the name must end, as
# cut-down variants only add a suffix ("RTX 4090 D", "A10G").
_GPUS: tuple[tuple[str, str, float, float, float], ...] = (
    # NVIDIA H100 Tensor Core GPU datasheet (H100 SXM, H100 NVL columns); sparse BF16 1,979 / 1,671,
    # TF32 989 / 835; FP32 67 / 60.
    (r"\bH100\b.*\bNVL$", "NVIDIA H100 NVL", 835.5, 417.5, 60.0),
    (r"\bH100\b.*\bPCIE$", "NVIDIA H100 PCIe", 756.5, 378.0, 51.0),  # earlier H100 datasheet, PCIe column
    (r"\bH100\b.*\b(SXM\w*|HBM3)$", "NVIDIA H100 SXM", 989.5, 494.5, 67.0),
    # NVIDIA GH200 Grace Hopper Superchip datasheet: the H100 SXM tensor cores.
    (r"\bGH200\b", "NVIDIA GH200", 989.5, 494.5, 67.0),
    # NVIDIA H200 Tensor Core GPU datasheet (H200 SXM, H200 NVL columns): the same rates as the H100's.
    (r"\bH200\b.*\bNVL$", "NVIDIA H200 NVL", 835.5, 417.5, 60.0),
    (r"\bH200$", "NVIDIA H200 SXM", 989.5, 494.5, 67.0),
    # NVIDIA H800 Tensor Core GPU datasheet (SXM, PCIe): the H100's tensor rates, less FP64 and NVLink.
    (r"\bH800\b.*\bPCIE$", "NVIDIA H800 PCIe", 756.5, 378.0, 51.0),
    (r"\bH800$", "NVIDIA H800 SXM", 989.5, 494.5, 67.0),
    # NVIDIA A100 Tensor Core GPU datasheet: every 40 GB / 80 GB, SXM / PCIe variant; dense BF16 312,
    # TF32 156, FP32 19.5. The A800 datasheet gives the same rates.
    (r"\bA100\b", "NVIDIA A100", 312.0, 156.0, 19.5),
    (r"\bA800\b", "NVIDIA A800", 312.0, 156.0, 19.5),
    # NVIDIA L40S datasheet: BF16 362.05 dense, TF32 183, FP32 91.6.
    (r"\bL40S$", "NVIDIA L40S", 362.05, 183.0, 91.6),
    # NVIDIA L40 datasheet: BF16 181.05 dense, TF32 90.5, FP32 90.5.
    (r"\bL40$", "NVIDIA L40", 181.05, 90.5, 90.5),
    # NVIDIA L4 datasheet: sparse BF16 242, TF32 120; FP32 30.3.
    (r"\bL4$", "NVIDIA L4", 121.0, 60.0, 30.3),
    # NVIDIA A10 datasheet: BF16 125 dense, TF32 62.5, FP32 31.2.
    (r"\bA10$", "NVIDIA A10", 125.0, 62.5, 31.2),
    # NVIDIA Ada Lovelace GPU architecture whitepaper, appendix (GeForce RTX 4090): BF16 tensor with
    # FP32 accumulate (what torch's bf16 matmul uses) 165.2 dense, TF32 82.6, FP32 82.6.
    (r"\bRTX 4090$", "NVIDIA GeForce RTX 4090", 165.2, 82.6, 82.6),
    # NVIDIA Ampere GA102 GPU architecture whitepaper (GeForce RTX 3090): BF16 with FP32 accumulate 71,
    # TF32 35.6, FP32 35.6.
    (r"\bRTX 3090$", "NVIDIA GeForce RTX 3090", 71.0, 35.6, 35.6),
)


def gpu_peak(name: str, dtype: str, tf32: bool = False) -> PeakRate:
    """The dense peak of the GPU called ``name`` for autocast ``dtype`` (``"bfloat16"`` or ``"float32"``;
    float32 matmuls run on TF32 tensor cores when ``tf32``, else on the FP32 units)."""
    key = re.sub(r"\s+", " ", name.strip().upper())
    if dtype == "bfloat16":
        col, prec = 0, "bf16"
    elif dtype == "float32":
        col, prec = (1, "tf32") if tf32 else (2, "fp32")
    else:
        return PeakRate(None, f"no peak rate for dtype {dtype!r}")
    for pattern, label, *rates in _GPUS:
        if re.search(pattern, key):
            rate = rates[col]
            return PeakRate(rate * 1e12, f"{label} dense {prec} peak, {rate:g} TFLOP/s (vendor datasheet)")
    return PeakRate(None, f"GPU {name!r} is not in engram.train.mfu's table of peak rates: MFU not computed")


def device_peak(device: torch.device | str, dtype: str) -> PeakRate:
    """The MFU denominator for a run on ``device`` with autocast ``dtype``: measured on the CPU, the
    table's on CUDA (TF32 when torch's float32 matmul precision allows it), none elsewhere."""
    device = torch.device(device)
    if device.type == "cpu":
        from engram.train.probe import peak_flops

        flops = peak_flops(torch.bfloat16 if dtype == "bfloat16" else torch.float32)
        return PeakRate(flops, f"measured CPU matmul peak, {flops / 1e9:.1f} GFLOP/s")
    if device.type == "cuda":
        tf32 = torch.get_float32_matmul_precision() != "highest"
        return gpu_peak(torch.cuda.get_device_name(device), dtype, tf32)
    return PeakRate(None, f"no peak rate for device type {device.type!r}: MFU not computed")


def mfu(flops_per_token: float, tokens_per_s: float, peak: PeakRate) -> float | None:
    """Model FLOPs utilisation: the share of ``peak`` that ``tokens_per_s`` tokens of ``flops_per_token``
    FLOPs each use (None without a peak)."""
    if peak.flops is None or peak.flops <= 0:
        return None
    return flops_per_token * tokens_per_s / peak.flops
