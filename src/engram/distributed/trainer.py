"""Data-parallel training with row-sharded Engram tables: the single-process `Trainer`, spread over ranks.

Semantics (the batches, and so the run, do not depend on the world size W): every rank draws the same
global batch of ``train.batch_size`` windows (same seed) and trains on its slice of ``batch_size / W`` rows.
The backbone is replicated under DDP (it averages the gradients), or with ``train.backbone_parallel="fsdp"``
sharded by FSDP2 (parameters, gradients and AdamW state are DTensors placed Shard(0), gathered block by block
for the forward and backward); each Engram table is split by rows over the ranks (`ShardedMemory`, on a
process group of its own so its exchanges never interleave with the backbone's collectives) and every rank's
SparseRowAdam updates its own rows. The objective is the mean over the global batch, so the table gradients,
which arrive at their owner as the sum of the ranks' local-mean gradients, are scaled by 1/W; gradient clipping
uses the global norm (per-tensor norms in the single-process order, a sharded tensor's from its parts' squared
norms summed over the ranks). The logged loss is the mean over the ranks, and every decision that stops or
saves (a non-finite loss, Ctrl-C) is taken from values all ranks share, so the ranks always stop together.

Rank 0 alone prints and writes the run's shared files; checkpoints are sharded (`engram.distributed.checkpoint`)
and load on any world size and either backbone mode, a single process included (``W = 1`` without a process
group: a plain ``engram train --resume`` of such a run).

Legend: B global batch, b rows per rank, T time, W world size.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.distributed as dist

from engram.config import ConfigError
from engram.distributed.checkpoint import ROW_STATE, PtSource, Source, find_newest_good, save_sharded
from engram.distributed.launch import DistContext, init_distributed
from engram.distributed.memory import ShardedMemory
from engram.distributed.parallel import clip_in_order_, local_part, reshard, shard_backbone
from engram.distributed.sharding import check_budget
from engram.train.checkpoint import CheckpointError
from engram.train.trainer import Trainer, _all_finite, lr_at

__all__ = ["DistTrainer", "rank0_first"]


def _on() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank0_first(fn):
    """``fn()`` on rank 0, then on the others (e.g. preparing a cached corpus: the others find it cached)."""
    if not _on():
        return fn()
    out = fn() if dist.get_rank() == 0 else None
    dist.barrier()
    return out if dist.get_rank() == 0 else fn()


class _NoMetrics:
    def log(self, **rec) -> None:
        pass

    def close(self) -> None:
        pass


class DistTrainer(Trainer):
    """`Trainer` on every rank of the default process group (see the module docstring).

    Extra args: ``ctx`` (from `engram.distributed.launch.init_distributed`; default: the environment's),
    ``memory_budget_bytes`` (a world whose per-rank table shards exceed it is refused before any work),
    ``exchange`` (the row exchange).
    """

    def __init__(self, cfg, run_dir, *, ctx: DistContext | None = None, memory_budget_bytes: int | None = None,
                 exchange: str = "all_to_all", **kw):
        self.ctx = ctx or init_distributed(device=kw.get("device", "cpu"))
        self.world, self.rank, self.is_main = self.ctx.world_size, self.ctx.rank, self.ctx.is_main
        self.budget, self.exchange, self._mesh = memory_budget_bytes, exchange, None
        super().__init__(cfg, run_dir, **kw)

    # -- setup -----------------------------------------------------------------------------------------
    def _prepare_data(self, cfg, cache_dir):
        from engram.train.trainer import prepare_run_data

        return rank0_first(lambda: prepare_run_data(cfg, cache_dir))

    def _holds_run(self, ckpt_dir: Path) -> bool:
        held = super()._holds_run(ckpt_dir) or (ckpt_dir.is_dir() and any(ckpt_dir.glob("step-*.json")))
        if _on():  # every rank looks before rank 0 writes anything
            dist.barrier()
        return held

    def _check_setup(self, vocab) -> None:
        tc, e = self.cfg.train, self.cfg.model.engram
        if tc.batch_size % self.world:
            raise ConfigError(f"train.batch_size={tc.batch_size} does not divide over {self.world} ranks: the global "
                              f"batch is split evenly, so use a multiple of {self.world}")
        if e is None:
            return
        if tc.engram_optimizer != "sparse_row_adam":
            raise ConfigError(f"train.engram_optimizer={tc.engram_optimizer!r}: row-sharded tables are trained by "
                              f"'sparse_row_adam' only")
        from engram.hashing import NgramHasher

        hasher = NgramHasher.from_config(e, vocab)
        heads = {layer: hasher.head_sizes(layer) for layer in e.layer_ids}
        check_budget(heads, e.n_embed_per_ngram // e.n_head_per_ngram, e.torch_table_dtype, self.world, self.budget)

    def _start_info(self) -> dict:
        return {"world_size": self.world, "backbone_parallel": self._mode()}

    def _mode(self) -> str:
        """How this process holds the backbone: the configured mode on a process group, whole without one."""
        return self.cfg.train.backbone_parallel if _on() else "none"

    def _device_mesh(self):
        """The 1-D mesh of the ranks, shared by the FSDP2 backbone and the checkpoints' row-sharded tables."""
        if self._mesh is None:
            from torch.distributed.tensor import init_device_mesh

            self._mesh = init_device_mesh(self.device.type, (self.world,))
        return self._mesh

    def _write_record(self, write) -> None:
        if self.is_main:
            write()
        if _on():
            dist.barrier()

    def _open_metrics(self, resume: bool):
        return super()._open_metrics(resume) if self.is_main else _NoMetrics()

    def _build_model(self, model):
        # The order of the parameters (tables included) that the single-process clipping sees, by name: FSDP2
        # replaces the parameters by DTensors of the same names.
        table_of = {id(blk.engram.table.weight): blk.layer for blk in model.blocks
                    if blk.engram is not None and blk.engram.table is not None}
        order = [table_of.get(id(p), n) for n, p in model.named_parameters()]
        from engram.model.params import count_params

        self._params = count_params(model)  # of the whole model: the tables leave it next
        self.mem = ShardedMemory.from_model(model, group=self.ctx.memory_group, exchange=self.exchange) \
            if table_of else None
        self.net = model
        # Experts that no token of a rank routes to get no gradient there: the reduction must not wait for them.
        unused = self.cfg.model.n_routed_experts > 0
        if self._mode() == "fsdp":
            self.net = shard_backbone(model, self._device_mesh(), unused=unused)
        elif _on():
            from torch.nn.parallel import DistributedDataParallel

            dev = [self.device.index] if self.device.type == "cuda" else None
            self.net = DistributedDataParallel(model, device_ids=dev, forward_sync_buffers=False,
                                               find_unused_parameters=unused)
        named = dict(model.named_parameters())
        self._clip_order = [x if isinstance(x, int) else named[x] for x in order]
        return model

    def _count_params(self) -> dict:
        return self._params

    def _table_parameters(self) -> list:
        return list(self.mem.shards.values()) if self.mem is not None else []

    # -- collectives -------------------------------------------------------------------------------------
    def _mean(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64)
        if _on():
            dist.all_reduce(t)
            t /= self.world
        return t.tolist()

    def _any(self, flag: bool) -> bool:
        if not _on():
            return flag
        t = torch.tensor([int(flag)])
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def _should_stop(self) -> bool:
        return self._any(self._stop)

    # -- one step ----------------------------------------------------------------------------------------
    def _train_step(self, x_BT, y_BT) -> tuple[float, float]:
        tc = self.cfg.train
        b = x_BT.shape[0] // self.world
        x_bT, y_bT = x_BT[self.rank * b:(self.rank + 1) * b], y_BT[self.rank * b:(self.rank + 1) * b]
        lr = lr_at(self.step, tc)
        for opt in (self.opt, self.table_opt):
            if opt is not None:
                for g in opt.param_groups:
                    g["lr"] = lr * g.get("lr_mult", 1.0)
        rows = self.model.engram_rows(x_bT) if self.model.hasher is not None else None
        with self._autocast():
            out = self.net(x_bT, y_bT, engram_rows=rows)
            loss = out.loss + self.cfg.model.router_aux_coef * out.aux_loss
        # The mean over the ranks, seen by all: they stop together on a non-finite loss.
        total, lm_loss = self._mean([float(loss.detach()), float(out.loss.detach())]) if self.world > 1 else \
            (float(loss.detach()), float(out.loss.detach()))
        if not math.isfinite(total):
            raise self._diverged("training loss", total)
        loss.backward()
        if self.world > 1 and self.mem is not None:
            for p in self.mem.shards.values():  # sums of W local means -> the global mean's gradient
                p.grad = p.grad / self.world
        gnorm = self._clip(tc.grad_clip) if tc.grad_clip > 0 else 0.0
        if not math.isfinite(gnorm):
            self._zero_grad()
            raise self._diverged("gradient norm", gnorm)
        self.opt.step()
        if self.table_opt is not None:
            self.table_opt.step()
        self._zero_grad()
        return lm_loss, gnorm

    def _zero_grad(self) -> None:
        self.model.zero_grad(set_to_none=True)
        if self.mem is not None:
            self.mem.zero_grad(set_to_none=True)

    def _clip(self, max_norm: float) -> float:
        """Clip by the global norm: the single-process computation (per-tensor norms in parameter order, then
        their norm), where a table's norm is that of all its shards' gradients together, and an FSDP2
        gradient's that of all its ranks' parts."""
        from engram.optim.sparse_adam import coalesce_

        grads, split = [], []
        for item in self._clip_order:
            p = self.mem.shard(item) if isinstance(item, int) else item
            if p.grad is None:
                continue
            g = coalesce_(p)._values() if p.grad.is_sparse else p.grad
            split.append(isinstance(item, int) or hasattr(g, "to_local"))
            grads.append(local_part(g))
        return clip_in_order_(grads, split, max_norm)

    # -- evaluation --------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> float:
        """Validation loss over the single-process batches, batch i on rank i mod W; the per-batch losses are
        gathered and summed in the single-process order, so every rank gets the single-process value."""
        self.model.eval()
        mine = self.val[self.rank::self.world]
        losses = []
        with self._autocast():
            for x, y in mine:
                losses.append((float(self.model(x, y).loss), y.numel()))
            for _ in range(math.ceil(len(self.val) / self.world) - len(mine)):
                if self._mode() == "fsdp":  # the others' forwards need this rank's parameters and rows
                    self.model(*self.val[0])
                elif self.mem is not None:  # the others' forwards need this rank's rows
                    self.mem.idle()
        reshard(self.model)
        self.model.train()
        parts = [losses]
        if _on():
            parts = [None] * self.world
            dist.all_gather_object(parts, losses)
        total, n = 0.0, 0
        for i in range(len(self.val)):
            loss, numel = parts[i % self.world][i // self.world]
            total += loss * numel
            n += numel
        return total / max(1, n)

    # -- checkpoints -------------------------------------------------------------------------------------
    def _find_checkpoint(self, ckpt_dir: Path, changes: list[str]):
        src, skipped = find_newest_good(ckpt_dir, self.cfg_dict)
        if skipped and src is None:
            raise CheckpointError(f"--resume: no checkpoint in {ckpt_dir} verifies: " + "; ".join(skipped))
        for s in skipped:
            self.notice(f"skipped checkpoint {s}; resuming from the newest intact one, {src.manifest.stem}")
        if src is None:
            self.notice(f"{self.run_dir} has no checkpoint yet (stopped before step {self.cfg.train.ckpt_every}): "
                        f"starting it again from step 0 with its recorded config")
            return None, None
        if src.step > self.cfg.train.steps:
            raise ConfigError(f"--resume: train.steps={self.cfg.train.steps} is below the step of the checkpoint to "
                              f"resume from ({src.step})")
        return src, src.manifest

    def _rows(self, local: torch.Tensor, num_rows: int):
        """``local`` (this rank's rows of a ``num_rows`` tensor) as what a checkpoint holds: a DTensor placed
        Shard(0) on the 1-D mesh of the ranks, or the tensor itself without a process group."""
        if not _on():
            return local
        from torch.distributed.tensor import DTensor, Shard

        shape = (num_rows, *local.shape[1:])
        stride = tuple(math.prod(shape[i + 1:]) for i in range(len(shape)))
        return DTensor.from_local(local, self._device_mesh(), [Shard(0)], run_check=False,
                                  shape=torch.Size(shape), stride=stride)

    def _backbone_names(self) -> list[tuple[str, torch.nn.Parameter]]:
        name = {id(p): n for n, p in self.model.named_parameters()}
        return [(name[id(p)], p) for g in self.opt.param_groups for p in g["params"]]

    def _flat_state(self) -> dict:
        out = {f"model/{k}": v for k, v in self.model.state_dict().items()}
        for n, p in self._backbone_names():
            for k, v in self.opt.state.get(p, {}).items():
                out[f"opt/{n}/{k}"] = v
        if self.mem is not None:
            for layer, s in self.mem.spec.items():
                out[f"tables/{layer}"] = self._rows(self.mem.shard(layer).detach(), s.num_rows)
                for k, v in self.table_opt.state.get(self.mem.shard(layer), {}).items():
                    out[f"table_opt/{layer}/{k}"] = self._rows(v, s.num_rows) if k in ROW_STATE else v
        return out

    def save(self) -> Path:
        tensors = list(self.model.parameters()) + self._table_parameters()
        bad = next((i for i, p in enumerate(tensors) if not _all_finite(local_part(p))), None)
        if self._any(bad is not None):
            raise self._diverged("a parameter", "non-finite", step=self.step)
        extra = {"sampler": self.sampler.state_dict(), "torch_rng": torch.get_rng_state(), "tokens": self.tokens,
                 "elapsed": self.elapsed, "world_size": self.world, "opt_groups": self.opt.state_dict()["param_groups"],
                 "table_opt_groups": self.table_opt.state_dict()["param_groups"] if self.table_opt else None}
        return save_sharded(self.run_dir / "ckpt", self.step, self._flat_state(), extra, self.cfg_dict)

    def _load(self, src: Source) -> None:
        names = self._backbone_names()
        if isinstance(src, PtSource):
            src.bind([n for n, _ in names])
            groups, table_groups = src.extra["opt"]["param_groups"], (src.extra["table_opt"] or {}).get("param_groups")
        else:
            groups, table_groups = src.extra["opt_groups"], src.extra["table_opt_groups"]
        have = src.keys()
        dest = {f"model/{k}": v for k, v in self.model.state_dict().items()}
        missing = [k for k in dest if k not in have]
        opt_state: dict[int, dict] = {}
        for i, (n, p) in enumerate(names):
            for key, (shape, dtype) in have.items():
                if key.startswith(f"opt/{n}/"):  # the state of an FSDP2 parameter is sharded like it
                    sharded = hasattr(p, "to_local") and tuple(shape) == tuple(p.shape)
                    t = torch.empty_like(p, dtype=dtype) if sharded else torch.empty(shape, dtype=dtype)
                    dest[key] = opt_state.setdefault(i, {})[key.rsplit("/", 1)[1]] = t
        table_state: dict[int, dict] = {}
        if self.mem is not None:
            for i, (layer, s) in enumerate(self.mem.spec.items()):
                key = f"tables/{layer}"
                if key not in have:
                    missing.append(key)
                dest[key] = self._rows(self.mem.shard(layer).detach(), s.num_rows)
                for k, (shape, dtype) in have.items():
                    if not k.startswith(f"table_opt/{layer}/"):
                        continue
                    name = k.rsplit("/", 1)[1]
                    if name in ROW_STATE:
                        t = self._rows(torch.empty((s.rows, *shape[1:]), dtype=dtype), s.num_rows)
                        table_state.setdefault(i, {})[name] = t.to_local() if hasattr(t, "to_local") else t
                    else:
                        t = table_state.setdefault(i, {})[name] = torch.empty(shape, dtype=dtype)
                    dest[k] = t
        if missing:
            raise CheckpointError(f"checkpoint {src.manifest.stem} lacks {', '.join(missing[:5])}: not a checkpoint "
                                  f"of this model")
        with torch.no_grad():
            src.load(dest)
        self.opt.load_state_dict({"state": opt_state, "param_groups": groups})
        if self.table_opt is not None:
            self.table_opt.load_state_dict({"state": table_state, "param_groups": table_groups})
        self.sampler.load_state_dict(src.extra["sampler"])
        torch.set_rng_state(src.extra["torch_rng"])
        self.step, self.tokens, self.elapsed = src.step, int(src.extra["tokens"]), float(src.extra["elapsed"])

    # -- the trained model -------------------------------------------------------------------------------
    def save_model(self, directory: Path) -> Path:
        from engram.distributed.model_io import save_sharded_model

        save_sharded_model(self, Path(directory))
        return directory
