"""Checkpoints of a row-sharded run with ``torch.distributed.checkpoint`` (DCP), loadable on any world size.

Layout inside a run directory::

    ckpt/step-0000200/         DCP files (.metadata, __<rank>_0.distcp) and extra.pt (step, sampler, RNG, config)
    ckpt/step-0000200.json     manifest: size and sha256 of every file of that directory (written after it)
    ckpt/latest.json           the newest complete checkpoint (written last)

The directory is written under a temporary name and renamed once every rank has written and hashed its
files; only then does rank 0 write the manifest. A checkpoint is trusted when its manifest exists and every
file it lists has its size and sha256, so a crash at any moment leaves the previous checkpoint usable.

Tensors, by flat key:

* ``model/<name>``: backbone parameters and buffers; ``opt/<name>/<k>``: their AdamW state (replicated:
  DCP writes one copy);
* ``tables/<layer>``: the table, a ``DTensor`` placed ``Shard(0)`` on a 1-D device mesh (each rank writes its
  rows: the row split of `engram.distributed.sharding` is DTensor's own rule);
* ``table_opt/<layer>/<k>``: SparseRowAdam's state, its row-indexed entries placed ``Shard(0)`` like the
  table, the step counter replicated.

Because the row split is DTensor's, DCP reshards on load: a checkpoint saved on N ranks loads on M, and on one
process without any process group (a plain ``engram train --resume``). A single-process ``.pt`` checkpoint
(`engram.train.checkpoint`) loads on M ranks too, each rank reading only its rows through ``mmap``.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from engram.atomic import atomic_write, fsync_dir
from engram.train.checkpoint import (
    CheckpointError,
    CheckpointMismatch,
    config_diffs,
    config_fingerprint,
    sha256_file,
    with_defaults,
)
from engram.train.resume import RESUMABLE

__all__ = ["DCP_FORMAT", "ROW_STATE", "Source", "find_newest_good", "is_sharded_run", "save_sharded"]

DCP_FORMAT = "engram-dcp-1"
EXTRA = "extra.pt"
# SparseRowAdam's per-row state: split over ranks exactly like the table rows.
ROW_STATE = ("exp_avg", "exp_avg_sq", "row_step", "last_step")


def _dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _dist() else 0


def _barrier() -> None:
    if _dist():
        dist.barrier()


def _step_of(name: str) -> int:
    try:
        return int(name.removeprefix("step-").removesuffix(".pt").removesuffix(".json"))
    except ValueError:
        return -1


# ----------------------------------------------------------------------------------------- saving

def save_sharded(ckpt_dir: Path, step: int, tensors: dict, extra: dict, cfg_dict: dict, keep: int = 2) -> Path:
    """Collective: write ``tensors`` (flat keys, see the module docstring) and ``extra`` as the checkpoint of
    ``step``; returns its manifest. Every rank calls it with its own shards; rank 0 writes the shared files."""
    ckpt_dir = Path(ckpt_dir)
    name = f"step-{step:07d}"
    tmp, final = ckpt_dir / f".{name}.partial", ckpt_dir / name
    rank = _rank()
    if rank == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # left by a save that was killed
        tmp.mkdir()
        torch.save({**extra, "step": step, "config": cfg_dict}, tmp / EXTRA)
    _barrier()
    with warnings.catch_warnings():  # one process without a process group is meant: DCP says so otherwise
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save(tensors, storage_writer=dcp.FileSystemWriter(tmp, single_file_per_rank=True, sync_files=True),
                 no_dist=not _dist())
    # Each rank hashes what it wrote; rank 0 also what is left (metadata, extra.pt).
    mine = {p.name: {"size": p.stat().st_size, "sha256": sha256_file(p)} for p in sorted(tmp.glob(f"__{rank}_*"))}
    parts = [None] * dist.get_world_size() if _dist() else [mine]
    if _dist():
        dist.all_gather_object(parts, mine)
    if rank == 0:
        files = {k: v for part in parts for k, v in part.items()}
        for p in sorted(tmp.iterdir()):
            if p.name not in files:
                files[p.name] = {"size": p.stat().st_size, "sha256": sha256_file(p)}
        fsync_dir(tmp)
        shutil.rmtree(final, ignore_errors=True)  # an unfinished save of this step (no manifest) from a killed run
        tmp.rename(final)
        fsync_dir(ckpt_dir)
        world = dist.get_world_size() if _dist() else 1
        manifest = {"format": DCP_FORMAT, "dir": name, "step": step, "world_size": world, "files": files,
                    "config_fingerprint": config_fingerprint(cfg_dict)}
        atomic_write(ckpt_dir / f"{name}.json", json.dumps(manifest, indent=1).encode())
        atomic_write(ckpt_dir / "latest.json", json.dumps({"name": name, "step": step}).encode())
        _prune(ckpt_dir, keep)
    _barrier()  # nobody moves on (or exits) before the checkpoint is complete
    return ckpt_dir / f"{name}.json"


def _prune(ckpt_dir: Path, keep: int) -> None:
    """Keep the newest ``keep`` complete checkpoints, of either kind (a run resharded from one process has both)."""
    manifests = sorted(ckpt_dir.glob("step-*.json"), key=lambda p: _step_of(p.name))
    for old in manifests[:-keep] if keep > 0 else []:
        old.unlink(missing_ok=True)
        old.with_suffix(".pt").unlink(missing_ok=True)
        shutil.rmtree(ckpt_dir / old.stem, ignore_errors=True)


# ----------------------------------------------------------------------------------------- loading

class Source:
    """A verified checkpoint to restore from: ``extra`` (step, sampler, RNG, config, optimizer groups) and
    :meth:`load`, which fills destination tensors by flat key."""

    def __init__(self, manifest: Path, extra: dict):
        self.manifest, self.extra = manifest, extra

    @property
    def step(self) -> int:
        return int(self.extra["step"])

    def keys(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """``{flat key: (global shape, dtype)}`` of every tensor the checkpoint holds."""
        raise NotImplementedError

    def load(self, dest: dict) -> None:
        """Fill ``dest`` (flat key -> tensor, or DTensor for a row-sharded one) in place; collective for DCP."""
        raise NotImplementedError


class DcpSource(Source):
    def __init__(self, manifest: Path, directory: Path, extra: dict):
        super().__init__(manifest, extra)
        self.directory = directory

    def keys(self) -> dict:
        meta = dcp.FileSystemReader(self.directory).read_metadata()
        out = {}
        for k, m in meta.state_dict_metadata.items():
            if hasattr(m, "size"):
                out[k] = (tuple(m.size), m.properties.dtype)
        return out

    def load(self, dest: dict) -> None:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(dest, storage_reader=dcp.FileSystemReader(self.directory), no_dist=not _dist())


class PtSource(Source):
    """A single-process checkpoint (``step-N.pt``) seen through the same flat keys; memory-mapped, so a rank
    copies only the rows it keeps. Its optimizer state is keyed by parameter index: :meth:`bind` names them."""

    def __init__(self, manifest: Path, state: dict):
        super().__init__(manifest, state)
        self.flat: dict[str, torch.Tensor] = {}

    def bind(self, backbone_names: list[str]) -> PtSource:
        """Name the AdamW state by ``backbone_names`` (the parameters in AdamW's order, which the single-process
        trainer builds the same way: model order, tables left out)."""
        self.flat = flatten_pt(self.extra, backbone_names)
        return self

    def keys(self) -> dict:
        return {k: (tuple(v.shape), v.dtype) for k, v in self.flat.items()}

    def load(self, dest: dict) -> None:
        from torch.distributed.tensor import DTensor

        for k, t in dest.items():
            src = self.flat[k]
            if isinstance(t, DTensor):
                local = t.to_local()
                start = _row_offset(t)
                local.copy_(src[start:start + local.shape[0]])
            else:
                t.copy_(src)


def _row_offset(t) -> int:
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    _, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    return int(offset[0])


def flatten_pt(state: dict, backbone_names: list[str]) -> dict[str, torch.Tensor]:
    """The flat keys of a single-process checkpoint: the tables leave ``model`` for ``tables/<layer>``, and the
    optimizers' index-keyed state takes the keys a sharded run gives it (parameter names, table layers)."""
    model = state["model"]
    table_of = {k: int(k.split(".")[1]) for k in model
                if k.startswith("blocks.") and k.endswith(".engram.table.weight")}
    out = {f"model/{k}": v for k, v in model.items() if k not in table_of}
    out.update({f"tables/{layer}": model[k] for k, layer in table_of.items()})
    for i, st in state["opt"]["state"].items():
        for k, v in st.items():
            out[f"opt/{backbone_names[int(i)]}/{k}"] = v
    layers = sorted(table_of.values())
    for i, st in (state["table_opt"] or {"state": {}})["state"].items():
        for k, v in st.items():
            out[f"table_opt/{layers[int(i)]}/{k}"] = v
    return out


def _verify_dcp(manifest: Path, man: dict) -> Path:
    d = manifest.with_name(man["dir"])
    if not d.is_dir():
        raise CheckpointError(f"checkpoint directory {d} is missing")
    for fname, info in man["files"].items():
        f = d / fname
        if not f.is_file():
            raise CheckpointError(f"checkpoint file {f} is missing")
        if f.stat().st_size != info["size"]:
            raise CheckpointError(f"checkpoint file {f} is truncated or altered: {f.stat().st_size} bytes, "
                                  f"manifest says {info['size']}")
        if sha256_file(f) != info["sha256"]:
            raise CheckpointError(f"checkpoint file {f} is corrupted: sha256 does not match its manifest")
    return d


def open_checkpoint(manifest: Path, cfg_dict: dict) -> Source:
    """Verify the checkpoint of ``manifest`` (either kind) and compare its config with ``cfg_dict`` (model, data
    and train sections, the resumable settings aside): CheckpointError when damaged, CheckpointMismatch when
    intact but of another configuration."""
    try:
        man = json.loads(manifest.read_text())
        fmt = man.get("format")
    except (ValueError, AttributeError) as e:
        raise CheckpointError(f"checkpoint manifest {manifest} is damaged ({e})") from None
    try:
        if fmt == DCP_FORMAT:
            d = _verify_dcp(manifest, man)
            extra = torch.load(d / EXTRA, map_location="cpu", weights_only=True)
            src: Source = DcpSource(manifest, d, extra)
        else:
            pt = manifest.with_name(man["file"])
            if not pt.is_file():
                raise CheckpointError(f"checkpoint file {pt} is missing")
            if pt.stat().st_size != man["size"] or sha256_file(pt) != man["sha256"]:
                raise CheckpointError(f"checkpoint {pt} is corrupted or truncated: it does not match its manifest")
            src = PtSource(manifest, torch.load(pt, map_location="cpu", weights_only=True, mmap=True))
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint manifest {manifest} is damaged ({e})") from None
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a bad file
        raise CheckpointError(f"checkpoint {manifest.stem} cannot be read ({e})") from None
    diffs = config_diffs(with_defaults(src.extra["config"]), cfg_dict, ("model", "data", "train"), ignore=RESUMABLE)
    if diffs:
        raise CheckpointMismatch(f"checkpoint {manifest.stem} was made with another configuration; differing "
                                 f"fields: " + "; ".join(diffs[:10]))
    return src


def find_newest_good(ckpt_dir: Path, cfg_dict: dict) -> tuple[Source | None, list[str]]:
    """``(source, skipped)``: the newest checkpoint of ``ckpt_dir`` (sharded or single-process) that verifies,
    walking back past damaged or unfinished ones (each described in ``skipped``); a checkpoint of another
    configuration stops the walk (CheckpointMismatch). ``(None, skipped)`` when none verifies."""
    ckpt_dir = Path(ckpt_dir)
    stems = {p.name.removesuffix(".pt").removesuffix(".json") for p in ckpt_dir.glob("step-*")}
    skipped = []
    for name in sorted(stems, key=_step_of, reverse=True):
        manifest = ckpt_dir / f"{name}.json"
        if not manifest.is_file():
            skipped.append(f"{name}: no manifest (a save that did not finish)")
            continue
        try:
            return open_checkpoint(manifest, cfg_dict), skipped
        except CheckpointMismatch:
            raise
        except CheckpointError as e:
            skipped.append(f"{name}: {e}")
    return None, skipped


def is_sharded_run(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a run trained on several ranks (its starts record a world size, or it has a
    sharded checkpoint): resuming it in one process needs the sharded trainer."""
    run_dir = Path(run_dir)
    try:
        meta = json.loads((run_dir / "meta.json").read_text())
        if any("world_size" in s for s in meta.get("starts", [])):
            return True
    except (OSError, ValueError, AttributeError):
        pass
    for m in (run_dir / "ckpt").glob("step-*.json"):
        try:
            if json.loads(m.read_text()).get("format") == DCP_FORMAT:
                return True
        except (OSError, ValueError, AttributeError):
            continue
    return False
