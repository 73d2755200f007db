"""The row exchange of a row-sharded table, forward and backward, in two forms.

``all_to_all`` (the default; the paper's and torchrec's): each rank uniques its ids, buckets them by
owner, exchanges counts, sends every owner the ids it owns, the owners gather locally and send the rows
back. A rank moves each distinct row it needs once, so the bytes per rank do not grow with the world
size. Backward is the same exchange reversed: each rank sums the gradients of its duplicate ids, sends
the sums to the owners, and an owner's gradient is a sparse COO tensor over its own rows only
(duplicates from several ranks are summed when the optimizer coalesces it).

``masked`` (Megatron's vocabulary-parallel embedding, generalised to per-rank ids): every rank learns
every rank's ids (all-gather), looks up the ones it owns with zeros elsewhere, and one all-reduce
assembles the rows. Two collectives of data instead of three, no unique/sort, but every rank moves the
whole world's rows: it wins only for small messages, where latency dominates.

Both are exact: rows are moved, never summed with anything but zeros, so they arrive bit for bit (the
masked form adds the raw bits as integers, so a ``-0.0`` survives too).

Legend: N ids on this rank, U distinct ids, S ids this rank owns and was asked for, d row width, W world.
"""

from __future__ import annotations

import math
import time

import torch
import torch.distributed as dist

__all__ = ["ExchangeStats", "gather_all_to_all", "gather_masked"]


class ExchangeStats:
    """Bytes and messages this rank has sent through the exchange (for benchmarks and the scaling model)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.bytes_sent = 0
        self.collectives = 0
        self.ids = 0
        self.unique_ids = 0
        self.seconds = 0.0  # wall time inside the collectives (waiting for slower peers included)

    def add(self, nbytes: int, collectives: int = 1, seconds: float = 0.0) -> None:
        self.bytes_sent += int(nbytes)
        self.collectives += collectives
        self.seconds += seconds

    def as_dict(self) -> dict:
        return {"bytes_sent": self.bytes_sent, "collectives": self.collectives, "ids": self.ids,
                "unique_ids": self.unique_ids, "seconds": self.seconds}


def _timed(stats: ExchangeStats | None, nbytes: int, fn, *args, **kwargs) -> None:
    t0 = time.perf_counter()
    fn(*args, **kwargs)
    if stats is not None:
        stats.add(nbytes, 1, time.perf_counter() - t0)


def _world(group) -> tuple[int, int]:
    if group is None and not (dist.is_available() and dist.is_initialized()):
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def _as_bytes(x_ND: torch.Tensor) -> torch.Tensor:
    """A ``[N, d]`` tensor's rows as ``[N, d * itemsize]`` uint8 (any dtype moves through any backend)."""
    return x_ND.contiguous().view(torch.uint8).reshape(x_ND.shape[0], x_ND.shape[1] * x_ND.element_size())


def _a2a(out: torch.Tensor, inp: torch.Tensor, out_splits: list[int], in_splits: list[int], group,
         stats: ExchangeStats | None) -> torch.Tensor:
    row = math.prod(inp.shape[1:]) * inp.element_size()
    _timed(stats, row * (sum(in_splits) - in_splits[_world(group)[1]]), dist.all_to_all_single, out, inp,
           out_splits, in_splits, group=group)
    return out


class _AllToAllGather(torch.autograd.Function):
    """Rows of ``idx_N`` (global ids) from the row-sharded ``shard``; backward: sparse gradient of the shard."""

    @staticmethod
    def forward(ctx, shard_Sd: torch.Tensor, idx_N: torch.Tensor, bounds: list[int], group, stats, scale):
        W, rank = _world(group)
        d = shard_Sd.shape[1]
        uniq_U, inv_N = torch.unique(idx_N, sorted=True, return_inverse=True)
        edges = torch.tensor(bounds[1:-1], dtype=uniq_U.dtype, device=uniq_U.device)
        cuts = torch.searchsorted(uniq_U, edges).tolist()
        send = [b - a for a, b in zip([0, *cuts], [*cuts, uniq_U.numel()], strict=True)]
        if stats is not None:
            stats.ids += idx_N.numel()
            stats.unique_ids += uniq_U.numel()
        if W == 1:
            recv, req_R = send, uniq_U
        else:
            counts = torch.empty(W, dtype=torch.int64, device=uniq_U.device)  # NCCL: on the GPU
            _a2a(counts, torch.tensor(send, dtype=torch.int64, device=uniq_U.device), [1] * W, [1] * W, group, stats)
            recv = counts.tolist()
            req_R = uniq_U.new_empty(sum(recv))
            _a2a(req_R, uniq_U, recv, send, group, stats)
        local_R = req_R - bounds[rank]
        rows_Rd = shard_Sd.detach().index_select(0, local_R)
        if W == 1:
            rows_Ud = rows_Rd
        else:
            rows_Ud = shard_Sd.new_empty(uniq_U.numel(), d)
            _a2a(_as_bytes(rows_Ud), _as_bytes(rows_Rd), send, recv, group, stats)
        ctx.save_for_backward(inv_N, local_R)
        ctx.meta = (send, recv, group, stats, shard_Sd.shape, uniq_U.numel(), shard_Sd.dtype, scale)
        return rows_Ud.index_select(0, inv_N)

    @staticmethod
    def backward(ctx, grad_Nd: torch.Tensor):
        inv_N, local_R = ctx.saved_tensors
        send, recv, group, stats, shape, U, dtype, scale = ctx.meta
        # Duplicates summed on the sender in fp32 (as the sparse-row optimizer coalesces half grads).
        g_Ud = torch.zeros(U, shape[1], dtype=torch.float32, device=grad_Nd.device)
        g_Ud.index_add_(0, inv_N, grad_Nd.float())
        if _world(group)[0] == 1:
            g_Rd = g_Ud
        else:
            g_Rd = g_Ud.new_empty(sum(recv), shape[1])
            _a2a(g_Rd, g_Ud, recv, send, group, stats)
        grad = torch.sparse_coo_tensor(local_R.unsqueeze(0), g_Rd, (shape[0], shape[1]), check_invariants=False)
        grad = grad.coalesce()  # the same row asked for by several ranks: summed here, in fp32
        return _scaled(grad, scale).to(dtype), None, None, None, None, None


def _scaled(grad: torch.Tensor, scale: float) -> torch.Tensor:
    return grad if scale == 1.0 else torch.sparse_coo_tensor(grad._indices(), grad._values() * scale, grad.shape,
                                                            is_coalesced=True)


def gather_all_to_all(shard_Sd: torch.Tensor, idx_N: torch.Tensor, bounds: list[int], group=None,
                      stats: ExchangeStats | None = None, grad_scale: float = 1.0) -> torch.Tensor:
    """Rows ``[N, d]`` of the global ids ``idx_N`` of a table whose rank r holds rows ``bounds[r]:bounds[r+1]``.

    Collective: every rank of ``group`` must call it, in the same order, even with no ids.
    Differentiable in ``shard_Sd`` (sparse COO gradient over the shard's rows, in the shard's dtype), times
    ``grad_scale`` (``1/W`` when each rank's loss is the mean over its own part of a global batch: the
    owner then holds the gradient of the global mean, as DDP's averaging gives the backbone).
    """
    return _AllToAllGather.apply(shard_Sd, idx_N.reshape(-1).to(torch.int64), list(bounds), group, stats,
                                 float(grad_scale))


def _int_view(x: torch.Tensor) -> torch.Tensor:
    """Raw bits as integers, so an all-reduce of one value with zeros returns the value bit for bit."""
    return x.view(torch.int32) if x.element_size() == 4 else x.view(torch.int16).to(torch.int32)


class _MaskedGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, shard_Sd: torch.Tensor, idx_N: torch.Tensor, bounds: list[int], group, stats, scale):
        W, rank = _world(group)
        d, N = shard_Sd.shape[1], idx_N.numel()
        if stats is not None:
            stats.ids += N
            stats.unique_ids += N
        if W == 1:
            sizes, ids_WM = [N], idx_N.unsqueeze(0)
        else:
            dev = idx_N.device
            n_W = [torch.zeros(1, dtype=torch.int64, device=dev) for _ in range(W)]
            _timed(stats, 8 * (W - 1), dist.all_gather, n_W, torch.tensor([N], dtype=torch.int64, device=dev),
                   group=group)
            sizes = [int(t) for t in n_W]
            M = max(sizes)
            padded = torch.zeros(M, dtype=torch.int64, device=dev)
            padded[:N] = idx_N
            parts = [torch.empty(M, dtype=torch.int64, device=dev) for _ in range(W)]
            _timed(stats, 8 * M * (W - 1), dist.all_gather, parts, padded, group=group)
            ids_WM = torch.stack(parts)
        lo, hi = bounds[rank], bounds[rank + 1]
        valid_WM = (torch.arange(ids_WM.shape[1], device=ids_WM.device).unsqueeze(0)
                    < torch.tensor(sizes, device=ids_WM.device).unsqueeze(1))
        mine_WM = (ids_WM >= lo) & (ids_WM < hi) & valid_WM  # padding is nobody's: never a touched row
        rows_WMd = shard_Sd.new_zeros(*ids_WM.shape, d)
        rows_WMd[mine_WM] = shard_Sd.detach().index_select(0, ids_WM[mine_WM] - lo)
        if W > 1:
            bits = _int_view(rows_WMd)
            # A ring all-reduce sends ~2 (W-1)/W of the buffer per rank.
            _timed(stats, 2 * (W - 1) * bits.numel() * bits.element_size() // W, dist.all_reduce, bits, group=group)
            rows_WMd = bits.view(shard_Sd.dtype) if shard_Sd.element_size() == 4 else \
                bits.to(torch.int16).view(shard_Sd.dtype)
        ctx.save_for_backward(ids_WM[mine_WM] - lo, mine_WM)
        ctx.meta = (rank, N, group, stats, shard_Sd.shape, shard_Sd.dtype, scale)
        return rows_WMd[rank, :N]

    @staticmethod
    def backward(ctx, grad_Nd: torch.Tensor):
        local_S, mine_WM = ctx.saved_tensors
        rank, N, group, stats, shape, dtype, scale = ctx.meta
        g_WMd = torch.zeros(*mine_WM.shape, shape[1], dtype=torch.float32, device=grad_Nd.device)
        g_WMd[rank, :N] = grad_Nd.float()
        W = mine_WM.shape[0]
        if W > 1:
            _timed(stats, 2 * (W - 1) * g_WMd.numel() * 4 // W, dist.all_reduce, g_WMd, group=group)
        grad = torch.sparse_coo_tensor(local_S.unsqueeze(0), g_WMd[mine_WM], (shape[0], shape[1]),
                                       check_invariants=False).coalesce()
        return _scaled(grad, scale).to(dtype), None, None, None, None, None


def gather_masked(shard_Sd: torch.Tensor, idx_N: torch.Tensor, bounds: list[int], group=None,
                  stats: ExchangeStats | None = None, grad_scale: float = 1.0) -> torch.Tensor:
    """The masked-lookup + all-reduce form of :func:`gather_all_to_all` (same contract, same rows)."""
    return _MaskedGather.apply(shard_Sd, idx_N.reshape(-1).to(torch.int64), list(bounds), group, stats,
                               float(grad_scale))
