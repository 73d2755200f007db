"""Atomic, checksummed training checkpoints.

Layout inside a run directory::

    ckpt/step-0000200.pt     torch.save of {model, optimizers, schedule, data, rng, step, config}
    ckpt/step-0000200.json   manifest: size, sha256, step, config fingerprint (written after the .pt)
    ckpt/latest.json         pointer to the newest complete checkpoint (written last)

Every file is written to a temporary name, flushed, fsynced and renamed, so a crash at any
moment leaves either the previous checkpoint or the new one, never a torn file that loads.
A checkpoint is only trusted when its manifest exists and its size and sha256 match.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from pathlib import Path

import torch

from engram.atomic import atomic_write


class CheckpointError(RuntimeError):
    """A checkpoint is missing, damaged, or belongs to another configuration."""


class CheckpointMismatch(CheckpointError):
    """An intact checkpoint of another configuration (not damage: an older one would not fit either)."""


class _HashingWriter:
    """File wrapper that hashes bytes as torch.save writes them (no second read pass)."""

    def __init__(self, f):
        self.f, self.h, self.n = f, hashlib.sha256(), 0

    def write(self, b) -> int:
        self.h.update(b)
        self.n += len(b)
        return self.f.write(b)

    def flush(self) -> None:
        self.f.flush()


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def config_fingerprint(cfg_dict: dict) -> str:
    return hashlib.sha256(json.dumps(cfg_dict, sort_keys=True).encode()).hexdigest()[:16]


def save_checkpoint(ckpt_dir: str | os.PathLike, step: int, state: dict, cfg_dict: dict, keep: int = 2) -> Path:
    """Write `state` for `step` atomically with a manifest; keep the newest `keep` checkpoints."""
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:07d}"
    final = ckpt_dir / f"{name}.pt"
    payload = {**state, "step": step, "config": cfg_dict}
    writers = []

    def save(f) -> None:
        writers.append(_HashingWriter(f))
        torch.save(payload, writers[0])

    atomic_write(final, save)
    w = writers[0]
    manifest = {"file": final.name, "step": step, "size": w.n, "sha256": w.h.hexdigest(),
                "config_fingerprint": config_fingerprint(cfg_dict), "format": "engram-ckpt-1"}
    atomic_write(ckpt_dir / f"{name}.json", json.dumps(manifest, indent=1).encode())
    atomic_write(ckpt_dir / "latest.json", json.dumps({"name": name, "step": step}).encode())
    for old in sorted(ckpt_dir.glob("step-*.json"))[:-keep] if keep > 0 else []:
        old.unlink(missing_ok=True)
        old.with_suffix(".pt").unlink(missing_ok=True)
    return final


def latest_checkpoint(ckpt_dir: str | os.PathLike) -> Path | None:
    """Manifest of the newest complete checkpoint, or None when there is none."""
    ckpt_dir = Path(ckpt_dir)
    ptr = ckpt_dir / "latest.json"
    if ptr.is_file():
        try:
            name = json.loads(ptr.read_text())["name"]
            if (ckpt_dir / f"{name}.json").is_file():
                return ckpt_dir / f"{name}.json"
        except (ValueError, KeyError):  # bad JSON or bytes that are not UTF-8
            pass  # fall back to scanning manifests
    manifests = sorted(ckpt_dir.glob("step-*.json"))
    return manifests[-1] if manifests else None


def load_checkpoint(manifest_path: str | os.PathLike, cfg_dict: dict | None = None,
                    compare_keys: tuple[str, ...] = ("model",), ignore: tuple[str, ...] = ()) -> dict:
    """Verify and load a checkpoint by its manifest (or .pt path).

    With `cfg_dict`, the sections in `compare_keys` must equal the checkpoint's, except the dotted
    fields in `ignore`; otherwise a CheckpointMismatch lists the fields that differ.
    """
    p = Path(manifest_path)
    if p.suffix == ".pt":
        p = p.with_suffix(".json")
    if not p.is_file():
        raise CheckpointError(f"no checkpoint manifest at {p} (an unfinished or foreign checkpoint?)")
    try:
        man = json.loads(p.read_text())
        pt = p.with_name(man["file"])
    except (ValueError, KeyError, TypeError) as e:  # bad JSON, bytes that are not UTF-8, wrong shape
        raise CheckpointError(f"checkpoint manifest {p} is damaged ({e})") from None
    if not pt.is_file():
        raise CheckpointError(f"checkpoint file {pt} is missing")
    size = pt.stat().st_size
    if size != man["size"]:
        raise CheckpointError(f"checkpoint {pt} is truncated or altered: {size} bytes, manifest says {man['size']}")
    if sha256_file(pt) != man["sha256"]:
        raise CheckpointError(f"checkpoint {pt} is corrupted: sha256 does not match its manifest")
    try:
        state = torch.load(pt, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a bad file
        raise CheckpointError(f"checkpoint {pt} cannot be read ({e})") from None
    if cfg_dict is not None:
        diffs = config_diffs(with_defaults(state["config"]), cfg_dict, compare_keys, ignore)
        if diffs:
            raise CheckpointMismatch(
                f"checkpoint {pt} was made with another configuration; differing fields: " + "; ".join(diffs[:10])
            )
    return state


def with_defaults(saved: dict) -> dict:
    """A checkpoint's config with the fields added to the config since it was written filled in with their
    defaults (which is what that run used), so a run resumes across such an addition; returned as it is
    where it does not parse (the comparison then names what differs)."""
    from engram.train.config import RunConfig

    try:
        return RunConfig.from_dict(copy.deepcopy(saved)).to_dict()
    except Exception:  # noqa: BLE001 - a foreign or damaged config: compare it raw
        return saved


def config_diffs(saved: dict, now: dict, keys: tuple[str, ...], ignore: tuple[str, ...] = ()) -> list[str]:
    """``"section.field: checkpoint X vs now Y"`` for every field of the sections ``keys`` that differs between
    a checkpoint's config ``saved`` and ``now``, the dotted fields in ``ignore`` aside."""
    diffs = []
    for key in keys:
        diffs += _diff(saved.get(key), now.get(key), key)
    return [d for d in diffs if d.split(":", 1)[0] not in ignore]


def _diff(a, b, prefix: str) -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), f"{prefix}.{k}")
        return out
    return [] if a == b else [f"{prefix}: checkpoint {a!r} vs now {b!r}"]
