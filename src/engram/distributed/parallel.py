"""The backbone's data parallelism (DDP or FSDP2), and gradient clipping by the global norm.

The Engram tables are not part of this: :class:`~engram.distributed.memory.ShardedMemory` has taken them
out of the model before it is wrapped, so DDP never all-reduces a table and FSDP never shards one twice.
Both wrappers run on gloo (CPU) and NCCL (GPU) with the same code; FSDP2 (``fully_shard``) shards every
block's parameters and optimizer state over the ranks, DDP replicates them.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from engram.config import ConfigError

__all__ = ["BACKBONE_MODES", "clip_global_grad_norm_", "wrap_backbone"]

BACKBONE_MODES = ("ddp", "fsdp")


def wrap_backbone(model: nn.Module, mode: str = "ddp", *, device: torch.device | None = None) -> nn.Module:
    """``model`` made data-parallel over the default process group.

    ``ddp``: ``DistributedDataParallel`` with ``find_unused_parameters=True`` (a rank whose tokens route
    to no token of some MoE expert leaves that expert's parameters out of its graph). ``fsdp``: FSDP2's
    ``fully_shard`` on every block, then on the root (in place; the returned module is ``model``).
    """
    if mode not in BACKBONE_MODES:
        raise ConfigError(f"backbone parallelism must be one of {', '.join(BACKBONE_MODES)}, got {mode!r}")
    device = device or next(model.parameters()).device
    if mode == "ddp":
        ids = [device.index] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=True)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for blk in getattr(model, "blocks", []):
        fully_shard(blk, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _sq_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    total = torch.zeros((), dtype=torch.float64)
    for g in grads:
        if hasattr(g, "full_tensor"):  # an FSDP2 DTensor: its local part; the shards are summed below
            g = g.to_local()
        total += g.detach().double().pow(2).sum().cpu()
    return total


def clip_global_grad_norm_(backbone: list[nn.Parameter], tables: list[nn.Parameter], max_norm: float, *,
                           sharded_backbone: bool = False, group=None) -> float:
    """Clip every gradient by the norm of the *whole* model's gradient, the one a single process sees.

    Backbone gradients are identical on every rank after DDP (or, with ``sharded_backbone``, split over
    the ranks by FSDP2); table gradients live on their owners only. The squared norms of the split parts
    are all-reduced, so every rank computes the same norm and the same clipping factor. Sparse table
    gradients are coalesced in place first. Returns the total norm (a float, equal on all ranks).
    """
    from engram.optim.sparse_adam import coalesce_

    split: list[torch.Tensor] = []
    for p in tables:
        if p.grad is not None:
            split.append(coalesce_(p)._values() if p.grad.is_sparse else p.grad)
    rep = [p.grad for p in backbone if p.grad is not None]
    if sharded_backbone:
        split, rep = split + rep, []
    local = torch.stack([_sq_norm(split), _sq_norm(rep)])
    if dist.is_available() and dist.is_initialized():
        parts = local.clone()
        parts[1] = 0
        dist.all_reduce(parts, group=group)
        local = torch.stack([parts[0], local[1]])
    total = float(local.sum().sqrt())
    if max_norm > 0:
        coef = min(1.0, float(max_norm) / (total + 1e-6))
        for t in split + rep:
            (t.to_local() if hasattr(t, "to_local") else t).mul_(coef)
    return total
