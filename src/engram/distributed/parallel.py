"""The backbone's data parallelism (DDP or FSDP2), gradient clipping by the global norm, full copies of sharded
state.

The Engram tables are not part of this: :class:`~engram.distributed.memory.ShardedMemory` has taken them
out of the model before it is wrapped, so DDP never all-reduces a table and FSDP never shards one twice.
Both wrappers run on gloo (CPU) and NCCL (GPU) with the same code; FSDP2 (``fully_shard``) shards every
block's parameters and optimizer state over the ranks, DDP replicates them.
"""

from __future__ import annotations

from typing import get_args

import torch
import torch.distributed as dist
from torch import nn

from engram.config import ConfigError
from engram.train.config import BackboneParallel

__all__ = ["BACKBONE_MODES", "clip_global_grad_norm_", "clip_in_order_", "full_state_dict", "local_part",
           "reshard", "shard_backbone", "wrap_backbone"]

BACKBONE_MODES = get_args(BackboneParallel)


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

    return shard_backbone(model, init_device_mesh(device.type, (dist.get_world_size(),)))


def shard_backbone(model: nn.Module, mesh, *, unused: bool = False) -> nn.Module:
    """FSDP2 on ``model`` in place over the 1-D ``mesh``: ``fully_shard`` on every block (its parameters are
    gathered for its own forward and backward only), then on the root (embeddings, final norm, head).

    Parameters, gradients and the optimizer state built on them become DTensors placed ``Shard(0)``: the
    row split of `engram.distributed.sharding`, so a checkpoint holds them as it holds the tables.
    ``unused``: some parameters may get no gradient on some ranks (MoE experts no local token routes to);
    they are then reduced as zeros, or the ranks' reduce-scatters would not match (DDP's
    ``find_unused_parameters``).
    """
    from torch.distributed.fsdp import fully_shard

    for blk in getattr(model, "blocks", []):
        fully_shard(blk, mesh=mesh)
    fully_shard(model, mesh=mesh)
    if unused:
        model.set_reduce_scatter_unused_params(True)
    return model


def local_part(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``t`` (a DTensor's local tensor, sharing its storage), or ``t`` itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def reshard(model: nn.Module) -> None:
    """Put every FSDP2 module of ``model`` back on its sharded parameters. After a forward that no backward
    followed (an evaluation) FSDP2 leaves the root's parameters gathered and registered in place of the
    sharded ones, which the optimizer and the checkpoints know by identity. Not a collective; nothing to do
    without FSDP2."""
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def full_state_dict(model: nn.Module, keep: bool = True) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with every DTensor gathered whole. A collective when the model is sharded: every
    rank calls it, in the same order of keys; ``keep=False`` drops each gathered tensor at once (the ranks
    that only take part, so no rank but the writer ever holds more than one whole tensor)."""
    out = {}
    for k, v in model.state_dict().items():
        full = v.full_tensor() if hasattr(v, "full_tensor") else v
        if keep:
            out[k] = full
    return out


@torch.no_grad()
def clip_in_order_(grads: list[torch.Tensor], split: list[bool], max_norm: float, group=None) -> float:
    """Clip ``grads`` in place by their global norm, computed as one process computes it: per-tensor norms in
    the order given, then the norm of those. ``split[i]``: ``grads[i]`` is only this rank's part of a gradient
    (a table shard's, the local part of an FSDP2 DTensor's): its squared norm is summed over the ranks of
    ``group``, so every rank gets the whole tensor's norm. The other norms are computed exactly as a single
    process does, so a world without split gradients clips bit for bit like one process. Returns the norm
    (equal on every rank)."""
    from torch.utils._foreach_utils import _group_tensors_by_device_and_dtype, _has_foreach_support

    if not grads:
        return 0.0
    norms, where = [], []
    for (device, _), ([ts], idx) in _group_tensors_by_device_and_dtype([grads], with_indices=True).items():
        if _has_foreach_support(ts, device):
            norms.extend(torch._foreach_norm(ts, 2.0))
        else:
            norms.extend(torch.linalg.vector_norm(g, 2.0) for g in ts)
        where.extend(idx)
    parts = [j for j, i in enumerate(where) if split[i]]
    if parts and dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        sq = torch.stack([norms[j].double() ** 2 for j in parts])
        dist.all_reduce(sq, group=group)
        for j, v in zip(parts, sq.sqrt(), strict=True):
            norms[j] = v.to(norms[j].dtype)
    first = grads[0].device
    total = torch.linalg.vector_norm(torch.stack([n.to(first) for n in norms]), 2.0)
    coef = torch.clamp(float(max_norm) / (total + 1e-6), max=1.0)
    for g in grads:
        g.mul_(coef.to(g.device))
    return float(total)


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
