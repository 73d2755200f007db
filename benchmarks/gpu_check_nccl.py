"""The `nccl_smoke` check of `gpu_check`: a one-process NCCL group running the row-sharded exchange.

A lent machine has one GPU, so the group has one rank: ``init_process_group("nccl", store=HashStore(),
rank=0, world_size=1)``, no launcher and no network. Through it, both forms of the row exchange of
`engram.distributed.exchange` (``all_to_all`` and ``masked``) look up rows of a small table and must
return exactly the unsharded lookup, and their sparse gradient must equal the dense one. With one rank
the exchange has nobody to send to and skips its collectives, so the check also pushes the rows' bytes
through ``all_to_all_single`` and their bits through ``all_reduce`` (the two collectives the exchange
uses at larger worlds) and checks they come back unchanged: the NCCL library, its CUDA kernels and the
device binding are then exercised. On a CPU the same runs with gloo (the dry run). The group is
destroyed afterwards, whatever happened.

Legend: N ids, R table rows, d row width.
"""

from __future__ import annotations


def check_nccl_smoke(ctx, rec: dict) -> None:
    """Exchange == unsharded lookup (rows bit for bit, gradients to fp32 rounding) in a world of one."""
    import torch
    import torch.distributed as dist

    from engram.distributed.exchange import ExchangeStats, gather_all_to_all, gather_masked
    from engram.distributed.sharding import row_bounds
    from gpu_check import Skip, synchronize

    cuda = ctx.device.type == "cuda"
    backend = "nccl" if cuda else "gloo"
    if not dist.is_available():
        raise Skip(f"this torch ({torch.__version__}) is built without torch.distributed")
    if cuda and not dist.is_nccl_available():
        raise Skip(f"this torch ({torch.__version__}) is built without NCCL")
    if dist.is_initialized():
        raise Skip("a default process group exists already in this process")
    if cuda:
        torch.cuda.set_device(ctx.device)
        rec["nccl_version"] = ".".join(map(str, torch.cuda.nccl.version()))
    R, d, N = (1000, 16, 256) if ctx.tiny else (200_000, 128, 65_536)
    g = torch.Generator().manual_seed(0)
    table_Rd = torch.randn(R, d, generator=g).to(ctx.device)
    # Zipf-like ids: many duplicates, as a batch of text gives the tables.
    idx_N = ((torch.rand(N, generator=g) ** 3) * R).long().clamp(max=R - 1).to(ctx.device)
    w_Nd = torch.randn(N, d, generator=g).to(ctx.device)
    ref_Rd = table_Rd.clone().requires_grad_(True)
    (ref_Rd[idx_N] * w_Nd).sum().backward()
    want_Nd = table_Rd[idx_N]
    rec.update(backend=backend, world_size=1, rows=R, dim=d, ids=N, distinct_ids=int(idx_N.unique().numel()))

    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    try:
        group = dist.group.WORLD
        for name, gather in (("all_to_all", gather_all_to_all), ("masked", gather_masked)):
            shard_Rd = table_Rd.clone().requires_grad_(True)
            stats = ExchangeStats()
            got_Nd = gather(shard_Rd, idx_N, row_bounds(R, 1), group=group, stats=stats)
            (got_Nd * w_Nd).sum().backward()
            # Duplicate ids' gradients are summed in another order than the dense backward's: fp32 rounding.
            grad_diff = float((shard_Rd.grad.to_dense() - ref_Rd.grad).abs().max() / ref_Rd.grad.abs().max())
            rec[name] = {"rows_equal": bool(torch.equal(got_Nd, want_Nd)), "grad_rel_diff": grad_diff,
                         "grad_sparse": bool(shard_Rd.grad.is_sparse), **stats.as_dict()}
        # The collectives themselves, on the exchanged rows.
        bytes_NB = want_Nd.contiguous().view(torch.uint8)
        back_NB = torch.empty_like(bytes_NB)
        dist.all_to_all_single(back_NB, bytes_NB, [N], [N], group=group)
        bits_Nd = want_Nd.contiguous().view(torch.int32).clone()
        dist.all_reduce(bits_Nd, group=group)
        dist.barrier(group=group)
        synchronize(ctx.device)
        rec["all_to_all_single_equal"] = bool(torch.equal(back_NB, bytes_NB))
        rec["all_reduce_equal"] = bool(torch.equal(bits_Nd.view(torch.float32), want_Nd))
    finally:
        dist.destroy_process_group()
    bad = [k for k in ("all_to_all", "masked") if not rec[k]["rows_equal"] or rec[k]["grad_rel_diff"] > 1e-5]
    bad += [k for k in ("all_to_all_single_equal", "all_reduce_equal") if not rec[k]]
    if bad:
        raise AssertionError(f"{backend} world of one: {', '.join(bad)} differ from the unsharded lookup")
