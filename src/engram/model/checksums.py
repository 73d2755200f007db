"""Checksums of a model directory: ``checksums.json`` records a sha256 of every file, and loading
verifies them, so a flipped byte in the weights is an error naming the file instead of a model that
quietly produces garbage.

The manifest is written last (after every file of the directory) and removed first when a directory
is saved again, so a save that did not finish leaves a directory without one, which does not load.

The weights file (safetensors) is checked in pieces: its header and each tensor's bytes have their own
sha256, and the pieces tile the whole file. A load that leaves the Engram tables on disk
(``tables=False``) so verifies every byte it reads without reading a table larger than RAM; whoever
streams a table later checks it with :class:`TensorDigest`. A tensor larger than a block also has a
sha256 per block of whole rows, so a reader of a few rows (one rank's range of an Engram table) checks
what it reads by reading at most the blocks around it, not the whole tensor.

Sub-folders are covered like the top level (a sharded-tables directory keeps its table shards in
``tables/``, see :mod:`engram.model.sharded_tables`).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

import torch

from engram.atomic import fsync_dir, write_json_atomic

MANIFEST_FILE = "checksums.json"
FORMAT, VERSION = "engram-model-checksums", 1
_CHUNK = 1 << 22
# Rows per block are chosen so a block holds at most this many bytes; tensors no larger get no blocks.
_BLOCK_BYTES = 16 << 20
# Files that loading or serving reads from a model directory: present but not listed means they were
# put there after the save (or by one that did not finish), and are refused.
_READ_BY_LOADERS = ("config.json", "model.safetensors", "vocab.safetensors", "tokenizer.txt")
_READ_BY_LOADERS_UNDER = ("tokenizer/", "tables/")


def _is_tmp(p: Path) -> bool:
    return ".tmp-" in p.name  # engram.atomic's temporary names


def _files(directory: Path) -> list[str]:
    """Every regular file under ``directory`` (relative posix paths, sorted), but the manifest and temporaries."""
    out = []
    for p in directory.rglob("*"):
        rel = p.relative_to(directory).as_posix()
        if p.is_file() and not p.is_symlink() and rel != MANIFEST_FILE and not _is_tmp(p):
            out.append(rel)
    return sorted(out)


def _hash_range(f, start: int, end: int) -> str:
    h, buf = hashlib.sha256(), bytearray(_CHUNK)
    f.seek(start)
    left = end - start
    while left > 0:
        n = f.readinto(memoryview(buf)[: min(_CHUNK, left)])
        if not n:
            break  # shorter than recorded: the caller compared sizes first, so only a racing writer gets here
        h.update(memoryview(buf)[:n])
        left -= n
    return h.hexdigest()


def _hash_blocks(f, start: int, end: int, block: int) -> tuple[str, list[str]]:
    """The sha256 of bytes ``[start, end)`` and of each ``block`` bytes of them, in one pass."""
    whole, blocks, h, in_block = hashlib.sha256(), [], hashlib.sha256(), 0
    buf = bytearray(_CHUNK)
    f.seek(start)
    left = end - start
    while left > 0:
        n = f.readinto(memoryview(buf)[: min(_CHUNK, left)])
        if not n:
            break
        view = memoryview(buf)[:n]
        whole.update(view)
        while len(view):
            take = min(len(view), block - in_block)
            h.update(view[:take])
            view, in_block = view[take:], in_block + take
            if in_block == block:
                blocks.append(h.hexdigest())
                h, in_block = hashlib.sha256(), 0
        left -= n
    if in_block:
        blocks.append(h.hexdigest())
    return whole.hexdigest(), blocks


def block_rows(nbytes: int, rows: int) -> int | None:
    """Rows per verification block of a tensor of ``rows`` rows and ``nbytes`` bytes (None: one piece)."""
    if rows < 2 or nbytes <= _BLOCK_BYTES:
        return None
    return max(1, _BLOCK_BYTES // (nbytes // rows))


def _safetensors_pieces(path: Path, size: int) -> list[dict] | None:
    """``[{name, start, end}]`` tiling the file: "header", each tensor, and any "gap"; None if not safetensors.
    A tensor piece also carries ``rows`` (its first dimension) while the manifest entry is built."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return None
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            return None
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None
    base = 8 + n
    try:
        ranges = sorted((base + v["data_offsets"][0], base + v["data_offsets"][1], k, (v.get("shape") or [1])[0])
                        for k, v in header.items() if k != "__metadata__")
    except (TypeError, KeyError, IndexError, AttributeError):
        return None
    pieces, pos = [{"name": "header", "start": 0, "end": base}], base
    for start, end, name, rows in ranges:
        if start < pos or end < start or end > size:
            return None  # overlapping or out-of-file tensors: not a file this code wrote
        if start > pos:
            pieces.append({"name": "gap", "start": pos, "end": start})
        pieces.append({"name": name, "start": start, "end": end, "rows": int(rows)})
        pos = end
    if pos < size:
        pieces.append({"name": "gap", "start": pos, "end": size})
    return pieces


def _entry(path: Path) -> dict:
    size = path.stat().st_size
    pieces = _safetensors_pieces(path, size) if path.suffix == ".safetensors" else None
    with open(path, "rb") as f:
        if pieces is None:
            return {"size": size, "sha256": _hash_range(f, 0, size)}
        for p in pieces:
            rows = p.pop("rows", 1)
            br = block_rows(p["end"] - p["start"], rows)
            if br is None:
                p["sha256"] = _hash_range(f, p["start"], p["end"])
            else:
                p["sha256"], p["blocks"] = _hash_blocks(f, p["start"], p["end"], br * ((p["end"] - p["start"]) // rows))
                p["block_rows"] = br
    return {"size": size, "pieces": pieces}


def unseal(directory: str | os.PathLike) -> None:
    """Remove the manifest before files of ``directory`` are rewritten: until :func:`seal` runs again
    the directory does not load, whatever happens in between."""
    d = Path(directory)
    if (d / MANIFEST_FILE).exists():
        (d / MANIFEST_FILE).unlink()
        fsync_dir(d)


def seal(directory: str | os.PathLike) -> Path:
    """Record the sha256 of every file now in ``directory`` in its manifest (written atomically, last)."""
    d = Path(directory)
    files = {rel: _entry(d / rel) for rel in _files(d)}
    return write_json_atomic(d / MANIFEST_FILE, {"format": FORMAT, "version": VERSION, "algorithm": "sha256",
                                                 "files": files}, indent=1)


def read_manifest(directory: str | os.PathLike) -> dict:
    """The parsed manifest of a model directory; ValueError when it is missing or damaged."""
    d = Path(directory)
    path = d / MANIFEST_FILE
    if not path.is_file():
        raise ValueError(f"no {MANIFEST_FILE} in {d}: a save that did not finish, or a model directory from an "
                         f"older engram; its files cannot be verified, so it is not loaded (if you trust it, "
                         f"re-save it: EngramLM.from_pretrained(dir, verify=False).save_pretrained(dir))")
    try:
        m = json.loads(path.read_text())
        ok = m.get("format") == FORMAT and isinstance(m.get("files"), dict)
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise ValueError(f"{path} is damaged ({e})") from None
    if not ok:
        raise ValueError(f"{path} is not an engram model checksum manifest")
    if m.get("version") != VERSION:
        raise ValueError(f"{path} has version {m.get('version')}, this code reads version {VERSION}")
    return m


def verify(directory: str | os.PathLike, *, skip_tensors: tuple[str, ...] = ()) -> dict:
    """Check every file the manifest lists (size and sha256) and return the manifest.

    ``skip_tensors``: tensors of a safetensors file that are not read now (the Engram tables of a
    ``tables=False`` load), checked later by their reader with :class:`TensorDigest`.
    Raises ValueError naming the first file (and tensor) that does not match.
    """
    d = Path(directory)
    m = read_manifest(d)
    listed = m["files"]
    for rel in _files(d):
        if rel not in listed and (rel in _READ_BY_LOADERS or rel.startswith(_READ_BY_LOADERS_UNDER)):
            raise ValueError(f"{d / rel} is not covered by {d / MANIFEST_FILE} (put there after the model was "
                             f"saved?); re-save the model directory")
    for rel, want in sorted(listed.items()):
        path = d / rel
        if not path.is_file():
            raise ValueError(f"{path} is missing (listed in {d / MANIFEST_FILE})")
        size = path.stat().st_size
        if size != want["size"]:
            raise ValueError(f"{path} is truncated or altered: {size} bytes, {MANIFEST_FILE} says {want['size']}")
        with open(path, "rb") as f:
            if "sha256" in want:
                if _hash_range(f, 0, size) != want["sha256"]:
                    raise ValueError(f"{path} is corrupted: its sha256 does not match {MANIFEST_FILE}")
                continue
            for p in want["pieces"]:
                if p["name"] in skip_tensors:
                    continue
                if _hash_range(f, p["start"], p["end"]) != p["sha256"]:
                    what = {"header": "its header", "gap": f"bytes {p['start']}..{p['end']}"}.get(
                        p["name"], f"tensor {p['name']!r}")
                    raise ValueError(f"{path} is corrupted: the sha256 of {what} does not match {MANIFEST_FILE}")
    return m


class TensorDigest:
    """Checks one tensor of a model directory's weights file as it is read, piece by piece.

    For readers that stream a tensor which loading left on disk (an Engram table exported to a store,
    or read into RAM for serving): feed the pieces in order with :meth:`update`, then :meth:`check`.
    """

    def __init__(self, directory: str | os.PathLike, key: str, weights_file: str = "model.safetensors"):
        m = read_manifest(directory)
        entry = m["files"].get(weights_file, {})
        found = [p for p in entry.get("pieces", []) if p["name"] == key]
        if not found:
            raise ValueError(f"{Path(directory) / MANIFEST_FILE} records no tensor {key!r} of {weights_file}")
        self.path, self.key = Path(directory) / weights_file, key
        self.want, self.nbytes = found[0]["sha256"], found[0]["end"] - found[0]["start"]
        self._h, self._n = hashlib.sha256(), 0

    def update(self, piece: torch.Tensor) -> torch.Tensor:
        """Hash the next piece (rows in file order); returns it, to wrap a generator of pieces."""
        raw = piece.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        self._h.update(memoryview(raw))
        self._n += raw.size
        return piece

    def check(self) -> None:
        if self._n != self.nbytes or self._h.hexdigest() != self.want:
            raise ValueError(f"{self.path} is corrupted: the sha256 of tensor {self.key!r} does not match "
                             f"{MANIFEST_FILE}")
