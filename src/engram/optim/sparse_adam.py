"""Sparse-row Adam for the Engram memory tables, and gradient clipping that understands sparse grads.

Why not ``torch.optim.SparseAdam``? It is *lazy*: a row's moments and weight change only on the
steps that touch it. Dense Adam keeps moving a row after its gradient stops: with ``g = 0`` the
first moment decays by ``b1`` per step and ``sqrt(v)`` by ``sqrt(b2)``, so the row keeps stepping
by ``lr * r**j * m/sqrt(v)`` with ``r = b1/sqrt(b2)``. Summed, one touch of a rare row moves it
``(1-b1)/sqrt(1-b2) / (1-r)`` learning rates under dense Adam (5.8 lr at betas (0.9, 0.95),
31.8 lr at (0.9, 0.999)) but only ``(1-b1)/sqrt(1-b2)`` (0.45 resp. 3.2 lr) under lazy Adam: for
the long tail of hashed n-grams lazy Adam has a ~10x smaller effective learning rate. Most rows of
a big table are in that tail (see ``benchmarks/optim_study.md``).

:class:`SparseRowAdam` touches only the rows of the current gradient (gather, update, scatter: the
cost depends on the number of touched rows, never on the table size) and replays the steps a row
skipped in closed form (``catch_up``):

* ``"ahead"`` (default): after updating a row, also apply the whole decaying-momentum tail that
  dense Adam would apply over the following steps if the row were never touched again
  (``sum_j r**j`` -- a geometric series, with the bias-correction factors included exactly); when
  the row *is* touched again after ``k`` skipped steps, the part of that tail beyond ``k`` steps is
  taken back before the new step. A row therefore always sits where dense Adam would *settle* it,
  and the forward pass sees the momentum moves of rare rows without waiting for their next touch.
* ``"deferred"``: on the next touch, first apply the ``k`` skipped dense steps (decay of ``m`` and
  ``v``, the ``k`` momentum moves, decoupled weight decay), then the new step. Equals dense Adam
  exactly when every row is touched every step; otherwise a rare row lags by its pending tail.
* ``"none"``: lazy, like ``torch.optim.SparseAdam``.

Both catch-up modes are exact for dense Adam under constant lr, up to ``eps`` (the tail uses
``m/(sqrt(v)+eps)`` of the stored state) and up to using the current lr for the skipped steps.
They need ``b1**2 < b2`` (otherwise dense Adam's tail does not converge).

``bias_correction``: ``"row"`` (default; per-row step counters, so a row first touched at step
1000 is bias-corrected like a fresh Adam: with catch-up the counter is the row's age since its
first touch, skipped steps included; without catch-up it counts touches), ``"global"`` (the
parameter's step count, like dense Adam and torch's SparseAdam) or ``"none"``.

``rowwise=True`` keeps one second-moment scalar per row (the mean of ``g**2`` over the row, like
row-wise Adagrad in DLRM/FBGEMM), which halves the optimizer state.

State per parameter (all fp32 whatever the table dtype; created zero on the first step, the only
O(rows) operation): ``step`` (int64 scalar), ``exp_avg`` [R, d], ``exp_avg_sq`` [R, d] or [R]
(rowwise), ``row_step`` int32 [R] (``bias_correction="row"``) and ``last_step`` int32 [R] (the
step of the last touch; with catch-up). ``state_dict()``/``load_state_dict()`` round-trip exactly
(the base class would cast fp32 state to a bf16 table's dtype; this one does not).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import torch

from engram.memory.hugepages import advise_hugepages
from engram.optim import native_adam

__all__ = ["SparseRowAdam", "clip_grad_norm_", "coalesce_", "sparse_rows"]

BIAS_CORRECTIONS = ("row", "global", "none")
CATCH_UPS = ("ahead", "deferred", "none")

# Bias-correction tail tables are cut where the factor is within this of 1.
_TAIL_TOL = 1e-10
_TAIL_MAX = 1 << 21


def sparse_rows(grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rows [U] int64 unique ascending, values [U, d])`` of a gradient.

    A sparse COO gradient (sparse dim 1, as ``F.embedding(..., sparse=True)`` makes it) is
    coalesced first, so duplicate rows are summed (in fp32 for half-precision grads). A dense
    gradient is scanned for rows with a nonzero entry (an O(rows) pass over the dense gradient,
    which is O(rows) already).
    """
    D = math.prod(grad.shape[1:])
    if grad.is_sparse:
        if grad.sparse_dim() != 1:
            raise ValueError(f"sparse gradients must have one sparse (row) dimension, got {grad.sparse_dim()}")
        idx, vals = grad._indices()[0], grad._values().reshape(-1, D)
        if grad.is_coalesced():
            return idx, vals
        # torch.unique + index_add_ sums in the same order as Tensor.coalesce(), ~2x faster on CPU.
        rows, inv = torch.unique(idx, sorted=True, return_inverse=True)
        acc = vals.dtype if vals.dtype in (torch.float32, torch.float64) else torch.float32
        summed = torch.zeros(rows.numel(), D, dtype=acc, device=vals.device).index_add_(0, inv, vals.to(acc))
        return rows, summed
    g2 = grad.reshape(grad.shape[0], D)
    rows = torch.nonzero(g2.ne(0).any(dim=1)).squeeze(1)
    return rows, g2.index_select(0, rows)


def coalesce_(p: torch.Tensor) -> torch.Tensor | None:
    """Replace a sparse ``p.grad`` by its coalesced form (duplicate rows summed); return ``p.grad``."""
    grad = p.grad
    if grad is None or not grad.is_sparse or grad.is_coalesced():
        return grad
    rows, vals = sparse_rows(grad)
    p.grad = torch.sparse_coo_tensor(rows.unsqueeze(0), vals.to(grad.dtype).reshape(rows.numel(), *grad.shape[1:]),
                                     grad.shape, is_coalesced=True, check_invariants=False)
    return p.grad


class SparseRowAdam(torch.optim.Optimizer):
    """Adam whose state and weights change only on the rows touched by the gradient.

    Args:
        params: tables (>= 1-D; viewed as ``[rows, -1]``) or param groups.
        lr: learning rate (``param_groups[i]["lr"]``; LR schedulers work as usual).
        betas: ``(b1, b2)`` of Adam.
        eps: added to ``sqrt(v_hat)``, as in ``torch.optim.Adam``.
        weight_decay: decoupled (AdamW-style) decay, applied to touched rows only (with catch-up
            the skipped steps' decay ``(1 - lr*wd)**k`` is applied on the next touch). The paper
            uses 0 for the tables.
        bias_correction: ``"row"`` | ``"global"`` | ``"none"`` (see the module docstring).
        catch_up: ``"ahead"`` | ``"deferred"`` | ``"none"`` (see the module docstring).
        rowwise: one second-moment scalar per row instead of one per element.
        stochastic_rounding: for bf16 tables, round the fp32 result stochastically (deterministic:
            the random bits hash (row, column, step), so resumed runs stay bit-identical) instead
            of to nearest, so updates smaller than half a bf16 ulp are not lost on average.
        native: run the update in one pass per row with the C kernel of
            :mod:`engram.optim.native_adam` where it applies (fp32 CPU tables, default modes;
            ~10x faster, equal to the torch path up to a few float32 ulps).

    Gradients: sparse COO (uncoalesced is fine; duplicates are summed) or dense; for a dense
    gradient only rows with a nonzero entry count as touched (a row whose gradient is exactly
    zero is treated as untouched, which with catch-up is what dense Adam would do anyway).
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        bias_correction: str = "row",
        catch_up: str = "ahead",
        rowwise: bool = False,
        stochastic_rounding: bool = False,
        native: bool = True,
    ) -> None:
        if not lr >= 0.0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if not eps >= 0.0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        if not weight_decay >= 0.0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        bias_correction=bias_correction, catch_up=catch_up, rowwise=bool(rowwise),
                        stochastic_rounding=bool(stochastic_rounding))
        super().__init__(params, defaults)
        for group in self.param_groups:
            _check_group(group)
            for p in group["params"]:
                if p.dim() < 1:
                    raise ValueError("SparseRowAdam needs tables (parameters with at least one dimension)")
                if p.dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
                    raise ValueError(f"unsupported table dtype {p.dtype}")
        self._tails: dict = {}
        self.native = bool(native)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        _check_group(self.param_groups[-1])

    # ------------------------------------------------------------------ state
    def _init_state(self, p: torch.Tensor, group: dict) -> dict:
        state = self.state[p]
        R, D = p.shape[0], p[0].numel() if p.shape[0] else 0
        state["step"] = torch.tensor(0, dtype=torch.int64)
        state["exp_avg"] = _zeros((R, D), torch.float32, p.device)
        shape = (R,) if group["rowwise"] else (R, D)
        state["exp_avg_sq"] = _zeros(shape, torch.float32, p.device)
        if group["bias_correction"] == "row":
            state["row_step"] = _zeros((R,), torch.int32, p.device)
        if group["catch_up"] != "none":
            state["last_step"] = _zeros((R,), torch.int32, p.device)
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        """Load exactly: state tensors keep their saved dtype (fp32 moments, int counters)."""
        super().load_state_dict(state_dict)
        params = [p for g in self.param_groups for p in g["params"]]
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        for pid, p in zip(saved_ids, params, strict=True):
            saved = state_dict["state"].get(pid)
            if saved is None:
                continue
            # The step counter stays on the CPU, where `_init_state` puts it: `_update` reads it every
            # step, and on an accelerator that read would be a host sync.
            self.state[p] = {k: v.detach().clone().to("cpu" if k == "step" else p.device)
                             if isinstance(v, torch.Tensor) else v for k, v in saved.items()}

    def _tail(self, b1: float, b2: float, mode: str, device) -> torch.Tensor:
        """``Sinf[n] = sum_{j>=1} r**j * f(n+j)``, ``f(i) = sqrt(1-b2**i) / (1-b1**i)`` (1 if mode "none").

        What dense Adam's bias-corrected tail adds up to after a step at bias clock ``n`` if the row
        gets no more gradient, per unit of ``lr * m/sqrt(v)``. float64 [N+2]; ``Sinf[n > N]`` is the
        last entry (the bias factors have converged to 1 there).
        """
        key = (b1, b2, mode, str(device))
        tab = self._tails.get(key)
        if tab is None:
            r = b1 / math.sqrt(b2)
            geo = r / (1.0 - r)
            if mode == "none":
                tab = torch.tensor([geo, geo], dtype=torch.float64)
            else:
                slow = max(b1, b2)
                N = min(_TAIL_MAX, max(16, math.ceil(math.log(_TAIL_TOL) / math.log(slow)) if slow > 0 else 16))
                n = np.arange(N + 2, dtype=np.float64)
                with np.errstate(divide="ignore", invalid="ignore"):
                    e = np.sqrt(1.0 - b2**n) / (1.0 - b1**n) - 1.0
                e[0] = 0.0
                e[N + 1] = 0.0
                T = np.zeros(N + 2)
                # T[n] = r * (e[n+1] + T[n+1]): a first-order linear recurrence, run backwards.
                acc = 0.0
                for i in range(N, -1, -1):
                    acc = r * (e[i + 1] + acc)
                    T[i] = acc
                T[N + 1] = 0.0
                tab = torch.from_numpy(T + geo)
            tab = tab.to(device)
            self._tails[key] = tab
        return tab

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                rows, g = sparse_rows(p.grad)
                state = self.state[p] if self.state[p] else self._init_state(p, group)
                self._update(p, state, group, rows, g)
        return loss

    def _update(self, p: torch.Tensor, state: dict, group: dict, rows: torch.Tensor, g_UD: torch.Tensor) -> None:
        if not p.is_contiguous():
            raise ValueError("SparseRowAdam needs contiguous tables")
        state["step"] += 1
        t = int(state["step"])
        if rows.numel() == 0:
            return
        lr, eps, wd = float(group["lr"]), float(group["eps"]), float(group["weight_decay"])
        b1, b2 = (float(b) for b in group["betas"])
        bc, cu, rowwise = group["bias_correction"], group["catch_up"], group["rowwise"]
        f32 = torch.float32
        table = p.view(p.shape[0], math.prod(p.shape[1:]))
        if self.native and native_adam.supports(table, state, group):
            native_adam.sparse_adam_update(table, state, rows, g_UD.reshape(rows.numel(), -1), t, lr, (b1, b2), eps,
                                           wd, self._tail(b1, b2, bc, p.device))
            return
        g_UD = g_UD.to(f32)
        m_UD = state["exp_avg"].index_select(0, rows)
        v_U_ = state["exp_avg_sq"].index_select(0, rows)  # [U, d], or [U, 1] when rowwise
        if rowwise:
            v_U_ = v_U_.unsqueeze(1)
        w_UD = table.index_select(0, rows).to(f32)

        # Skipped steps k since the last touch, and the bias clock of the stored state (n_prev).
        k_U = n_prev_U = n_U = None
        if cu != "none":
            last_U = state["last_step"].index_select(0, rows).to(torch.int64)
            k_U = torch.where(last_U > 0, t - 1 - last_U, 0)
        if bc == "row":
            n_prev_U = state["row_step"].index_select(0, rows).to(torch.int64)
            n_U = n_prev_U + 1 if k_U is None else n_prev_U + k_U + 1
        elif k_U is not None:
            n_prev_U = last_U if bc == "global" else torch.zeros_like(k_U)

        if k_U is not None:
            tail = self._tail(b1, b2, bc, p.device)
            last_idx = tail.shape[0] - 1
            k_f = k_U.to(f32).unsqueeze(1)
            rk_U = torch.pow(b1 / math.sqrt(b2), k_U.to(torch.float64))
            # m/sqrt(v) of the stored state: the direction of its momentum tail.
            c_UD = m_UD / (v_U_.sqrt() + eps)
            if cu == "deferred":
                # S(n, k) = Sinf(n) - r^k Sinf(n+k): the k skipped momentum moves, applied now.
                s_U = tail[n_prev_U.clamp(max=last_idx)] - rk_U * tail[(n_prev_U + k_U).clamp(max=last_idx)]
                w_UD.addcmul_(c_UD, (lr * s_U).to(f32).unsqueeze(1), value=-1.0)
            else:
                # "ahead" applied the whole tail at the last touch: take back the part beyond k steps.
                s_U = rk_U * tail[(n_prev_U + k_U).clamp(max=last_idx)]
                w_UD.addcmul_(c_UD, (lr * s_U).to(f32).unsqueeze(1))
            m_UD.mul_(torch.pow(b1, k_f))
            v_U_.mul_(torch.pow(b2, k_f))
            if wd != 0.0:
                w_UD.mul_(torch.pow(1.0 - lr * wd, k_f))

        # The Adam step itself: torch.optim.AdamW's formula, with per-row bias correction.
        if wd != 0.0:
            w_UD.mul_(1.0 - lr * wd)
        m_UD.lerp_(g_UD, 1.0 - b1)
        if rowwise:
            v_U_.mul_(b2).add_(g_UD.square().mean(dim=1, keepdim=True), alpha=1.0 - b2)
        else:
            v_U_.mul_(b2).addcmul_(g_UD, g_UD, value=1.0 - b2)
        sqrt_v = v_U_.sqrt()
        n_same = t if bc == "global" else None
        if n_U is not None:
            # One read of both ends (a host sync on an accelerator, see docs/GUIDE.md).
            lo, hi = torch.stack(torch.aminmax(n_U)).tolist()
            if lo == hi:  # e.g. every row touched every step: scalars, as in torch.optim.Adam
                n_same = lo
        if bc == "none":
            w_UD.addcdiv_(m_UD, sqrt_v + eps, value=-lr)
        elif n_same is not None:
            bc1, bc2 = 1.0 - b1**n_same, 1.0 - b2**n_same
            w_UD.addcdiv_(m_UD, (sqrt_v / math.sqrt(bc2)).add_(eps), value=-lr / bc1)
        else:
            n_f = n_U.to(f32).unsqueeze(1)
            step_U = lr / (1.0 - torch.pow(b1, n_f))
            denom = (sqrt_v / torch.sqrt(1.0 - torch.pow(b2, n_f))).add_(eps)
            w_UD.addcmul_(m_UD / denom, step_U, value=-1.0)
        if cu == "ahead":
            # Apply now the momentum tail dense Adam would spread over the next steps.
            n_now_U = n_U if n_U is not None else torch.full_like(rows, t)
            s_U = tail[n_now_U.clamp(max=last_idx)]
            w_UD.addcmul_(m_UD / (sqrt_v + eps), (lr * s_U).to(f32).unsqueeze(1), value=-1.0)

        # Scatter back.
        state["exp_avg"].index_copy_(0, rows, m_UD)
        state["exp_avg_sq"].index_copy_(0, rows, v_U_.squeeze(1) if rowwise else v_U_)
        if bc == "row":
            state["row_step"].index_copy_(0, rows, n_U.to(torch.int32))
        if cu != "none":
            state["last_step"].index_fill_(0, rows, t)
        if table.dtype == f32:
            table.index_copy_(0, rows, w_UD)
        elif table.dtype == torch.bfloat16 and group["stochastic_rounding"]:
            table.index_copy_(0, rows, _stochastic_bf16(w_UD, rows, t))
        else:
            table.index_copy_(0, rows, w_UD.to(table.dtype))


def _zeros(shape: tuple, dtype: torch.dtype, device) -> torch.Tensor:
    """Zeros backed by huge pages where possible: the state is gathered at random rows like the table."""
    t = torch.empty(shape, dtype=dtype, device=device)
    advise_hugepages(t)  # before the first touch (zero_ below faults the pages in)
    return t.zero_()


def _check_group(group: dict) -> None:
    b1, b2 = group["betas"]
    if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
        raise ValueError(f"betas must be in [0, 1), got {group['betas']}")
    if group["bias_correction"] not in BIAS_CORRECTIONS:
        raise ValueError(f"bias_correction must be one of {BIAS_CORRECTIONS}, got {group['bias_correction']!r}")
    if group["catch_up"] not in CATCH_UPS:
        raise ValueError(f"catch_up must be one of {CATCH_UPS}, got {group['catch_up']!r}")
    if group["catch_up"] != "none" and not b1 * b1 < b2:
        raise ValueError(
            f"catch_up={group['catch_up']!r} needs b1**2 < b2 (dense Adam's momentum tail of an untouched "
            f"row diverges otherwise), got betas={group['betas']}"
        )


def _stochastic_bf16(x_UD: torch.Tensor, rows_U: torch.Tensor, step: int) -> torch.Tensor:
    """fp32 -> bf16 with stochastic rounding; the random bits hash (row, column, step)."""
    U, D = x_UD.shape
    lin = rows_U.unsqueeze(1) * D + torch.arange(D, device=x_UD.device)
    h = (lin + step * 0x9E3779B1) * 0x2545F4914F6CDD1D  # int64, wrapping
    h = h ^ (h >> 29)
    noise = (h & 0xFFFF).to(torch.int32)
    bits = x_UD.contiguous().view(torch.int32)
    bits = (bits + noise) & -65536
    return bits.view(torch.float32).to(torch.bfloat16)


@torch.no_grad()
def clip_grad_norm_(parameters, max_norm: float, norm_type: float = 2.0,
                    error_if_nonfinite: bool = False, foreach: bool | None = None) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` that also accepts sparse COO gradients.

    A sparse gradient is coalesced in place (``p.grad`` is replaced by its coalesced form, so
    duplicate rows are summed) and contributes the norm of its values; then every gradient is
    scaled in place by ``min(1, max_norm / (total_norm + 1e-6))``. Returns the total norm.
    """
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    tensors = []
    for p in parameters:
        if p.grad is None:
            continue
        if p.grad.is_sparse:
            tensors.append(coalesce_(p)._values())
        else:
            tensors.append(p.grad)
    if not tensors:
        return torch.tensor(0.0)
    total = torch.nn.utils.get_total_norm(tensors, norm_type, error_if_nonfinite, foreach)
    coef = torch.clamp(float(max_norm) / (total + 1e-6), max=1.0)
    for x in tensors:
        x.mul_(coef.to(x.device))
    return total
