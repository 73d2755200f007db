"""The Engram module against the same module written plainly, the way a research demo writes it.

The plain form (built here, from the module's definition): a dense ``nn.Embedding`` over the flat table,
one key ``nn.Linear`` and two ``nn.RMSNorm`` per residual branch in a Python loop, ``nn.RMSNorm`` per
branch before the conv and a depthwise ``nn.Conv1d`` with left padding. Its weights are copied from ours
and its output (and gradients) checked against ours before anything is timed.

Measured: forward, and forward + backward of ``out.sum()``, at 1 and 4 branches, one thread by default;
timed as strictly alternating pairs (ours, plain) so both see the same drift of a shared machine, reported
as the ratio plain / ours (how many times faster ours is): median of the per-pair ratios with a bootstrap
95% interval, and the ratio of total times. Targets: forward >= 1.5x, forward + backward >= 2.5x.

Run: .venv/bin/python benchmarks/bench_module.py [--quick] [--out results.json]
"""

# Shapes: B batch, T time, H hash heads, d row width, E = H*d, M residual branches, D hidden width.

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F
from torch import nn

from engram.model import Engram

from common import emit, machine_info, median_ci, total_ratio_ci


class PlainEngram(nn.Module):
    """The Engram block written plainly: dense embedding, per-branch modules in a loop, ``F.conv1d``."""

    def __init__(self, D: int, M: int, head_sizes: list[int], d: int, kernel_size: int, dilation: int) -> None:
        super().__init__()
        H = len(head_sizes)
        E = H * d
        self.M, self.D, self.k, self.dilation = M, D, kernel_size, dilation
        sizes = torch.tensor(head_sizes)
        self.register_buffer("offsets", torch.cumsum(sizes, 0) - sizes)
        self.embedding = nn.Embedding(sum(head_sizes), d)
        self.value_proj = nn.Linear(E, D)
        self.key_projs = nn.ModuleList([nn.Linear(E, D) for _ in range(M)])
        self.key_norms = nn.ModuleList([nn.RMSNorm(D) for _ in range(M)])
        self.query_norms = nn.ModuleList([nn.RMSNorm(D) for _ in range(M)])
        self.conv_norms = nn.ModuleList([nn.RMSNorm(D, eps=1e-5) for _ in range(M)])
        self.conv = nn.Conv1d(M * D, M * D, kernel_size, groups=M * D, bias=False,
                              padding=(kernel_size - 1) * dilation, dilation=dilation)

    @torch.no_grad()
    def load_from(self, ours: Engram) -> PlainEngram:
        M, D = self.M, self.D
        self.embedding.weight.copy_(ours.table.weight)
        self.value_proj.load_state_dict(ours.value_proj.state_dict())
        for m in range(M):
            self.key_projs[m].weight.copy_(ours.key_proj.weight[m * D:(m + 1) * D])
            self.key_projs[m].bias.copy_(ours.key_proj.bias[m * D:(m + 1) * D])
            self.key_norms[m].weight.copy_(ours.key_norm.weight[m])
            self.query_norms[m].weight.copy_(ours.query_norm.weight[m])
            self.conv_norms[m].weight.copy_(ours.short_conv.norm.weight[m])
        self.conv.weight.copy_(ours.short_conv.weight)
        return self

    def forward(self, h_BTMD: torch.Tensor, rows_BTH: torch.Tensor) -> torch.Tensor:
        B, T, M, D = h_BTMD.shape
        e_BTE = self.embedding(rows_BTH + self.offsets).flatten(2)
        v_BTD = self.value_proj(e_BTE)
        gates = []
        for m in range(M):
            k_BTD = self.key_norms[m](self.key_projs[m](e_BTE))
            q_BTD = self.query_norms[m](h_BTMD[:, :, m])
            s_BT = (k_BTD * q_BTD).sum(-1) / math.sqrt(D)
            s_BT = torch.sign(s_BT) * torch.sqrt(s_BT.abs().clamp_min(1e-6))
            gates.append(torch.sigmoid(s_BT))
        u_BTMD = torch.stack(gates, dim=2).unsqueeze(-1) * v_BTD.unsqueeze(2)
        xn_BTMD = torch.stack([self.conv_norms[m](u_BTMD[:, :, m]) for m in range(M)], dim=2)
        x_BCT = xn_BTMD.reshape(B, T, M * D).transpose(1, 2)
        y_BCT = F.silu(self.conv(x_BCT)[..., :T])
        return u_BTMD + y_BCT.transpose(1, 2).reshape(B, T, M, D)


def build(M: int, args) -> tuple[Engram, PlainEngram, torch.Tensor, torch.Tensor]:
    K, N = args.heads, args.max_ngram
    H = (N - 1) * K
    per_head = args.rows // H
    head_sizes = [per_head + 2 * i + 1 for i in range(H)]  # distinct sizes, like the hasher's primes
    torch.manual_seed(0)
    ours = Engram(args.hidden, head_sizes, max_ngram_size=N, n_head_per_ngram=K, n_embed_per_ngram=args.d * K,
                  hc_mult=M, conv_init="default")
    plain = PlainEngram(args.hidden, M, head_sizes, args.d, ours.short_conv.kernel_size, N).load_from(ours)
    g = torch.Generator().manual_seed(1)
    rows_BTH = torch.stack([torch.randint(0, s, (args.batch, args.seq), generator=g) for s in head_sizes], dim=-1)
    h_BTMD = torch.randn(args.batch, args.seq, M, args.hidden, generator=g)
    return ours, plain, h_BTMD, rows_BTH


def _grads(mod: nn.Module, h_BTMD: torch.Tensor, rows_BTH: torch.Tensor, key_w, mask_BT11) -> dict:
    h = h_BTMD.clone().requires_grad_(True)
    out = mod(h, rows_BTH)
    (out * out * mask_BT11.to(out.dtype)).sum().backward()
    g = {"out": out.detach(), "grad_h": h.grad, "grad_value_w": mod.value_proj.weight.grad,
         "grad_key_w": key_w(mod)}
    for p in mod.parameters():
        p.grad = None
    return g


def check_agree(ours: Engram, plain: PlainEngram, h_BTMD: torch.Tensor, rows_BTH: torch.Tensor) -> dict:
    """Both forms against the plain form in float64: outputs and gradients (input, value and key weights).

    Norm-wise relative errors; ours must be within 1e-5 of float64 or no less accurate than the plain
    form in float32. The gate is sigmoid(sign(s) sqrt(|s|)), whose slope is unbounded at s -> 0: there
    the gradient is ill-conditioned in any float32 form, so the loss leaves out positions whose gate is
    within 0.05 of 1/2 (|s| < ~0.04).
    """
    import copy

    def plain_key_w(m):
        return torch.cat([p.weight.grad for p in m.key_projs])

    with torch.no_grad():
        _, aux = ours(h_BTMD, rows_BTH, return_gates=True)
    mask_BT11 = ((aux["gates"] - 0.5).abs() > 0.05).all(-1)[..., None, None]
    ref = _grads(copy.deepcopy(plain).double(), h_BTMD.double(), rows_BTH, plain_key_w, mask_BT11)
    got = {"ours": _grads(ours, h_BTMD, rows_BTH, lambda m: m.key_proj.weight.grad, mask_BT11),
           "plain": _grads(plain, h_BTMD, rows_BTH, plain_key_w, mask_BT11)}
    errs = {form: {k: (torch.linalg.vector_norm(g[k].double() - ref[k]) / torch.linalg.vector_norm(ref[k])).item()
                   for k in ref} for form, g in got.items()}
    for k in ref:
        if errs["ours"][k] > max(1e-5, 1.5 * errs["plain"][k]):
            raise SystemExit(f"ours does not agree with the plain form in float64 ({k}): relative errors {errs}")
    return {form: {k: float(f"{v:.2e}") for k, v in e.items()} for form, e in errs.items()}


def time_pairs(ours, plain, h_BTMD, rows_BTH, backward: bool, pairs: int) -> dict:
    def run(mod) -> float:
        t0 = time.perf_counter()
        if backward:
            h = h_BTMD.requires_grad_(False)
            out = mod(h, rows_BTH)
            out.sum().backward()
            for p in mod.parameters():
                p.grad = None
        else:
            with torch.no_grad():
                mod(h_BTMD, rows_BTH)
        return time.perf_counter() - t0

    for _ in range(3):  # warm-up: allocator, kernels, the native library
        run(ours), run(plain)
    t = []
    for i in range(pairs):
        if i % 2 == 0:
            a, b = run(ours), run(plain)
        else:
            b, a = run(plain), run(ours)
        t.append((b, a))  # (plain, ours): ratios > 1 mean ours is faster
    ratios = [p / o for p, o in t]
    return {"speedup_median": median_ci(ratios), "speedup_total": total_ratio_ci(t),
            "ours_ms_median": round(1e3 * sorted(o for _, o in t)[len(t) // 2], 2),
            "plain_ms_median": round(1e3 * sorted(p for p, _ in t)[len(t) // 2], 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--heads", type=int, default=8, help="hash heads per n-gram order")
    ap.add_argument("--max-ngram", type=int, default=3)
    ap.add_argument("--d", type=int, default=32, help="row width per head")
    ap.add_argument("--rows", type=int, default=1_600_000, help="table rows, all heads")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--branches", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--pairs", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="small shapes, few pairs (a smoke run)")
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.quick:
        args.rows, args.batch, args.seq, args.pairs = 50_000, 2, 64, 4
    torch.set_num_threads(args.threads)
    result = {"benchmark": "bench_module", "machine": machine_info(),
              "shape": {k: getattr(args, k) for k in ("hidden", "heads", "max_ngram", "d", "rows", "batch", "seq")},
              "targets": {"forward": 1.5, "forward_backward": 2.5}, "branches": {}}
    for M in args.branches:
        ours, plain, h_BTMD, rows_BTH = build(M, args)
        entry = {"agreement_rel_err": check_agree(ours, plain, h_BTMD, rows_BTH)}
        entry["forward"] = time_pairs(ours, plain, h_BTMD, rows_BTH, False, args.pairs)
        entry["forward_backward"] = time_pairs(ours, plain, h_BTMD, rows_BTH, True, args.pairs)
        entry["met"] = {k: entry[k]["speedup_median"]["median"] >= result["targets"][k]
                        for k in ("forward", "forward_backward")}
        result["branches"][str(M)] = entry
    emit(result, args.out)


if __name__ == "__main__":
    main()
