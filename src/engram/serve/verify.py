"""Check a whole store directory: headers, every row's checksum, layout sidecars, the manifest.

Reads cover only the rows they serve, so a damaged row nobody asks for goes unnoticed until it is
read; :func:`verify_store_dir` (``engram verify STORE_DIR``) reads everything and lists every damaged
row, e.g. after copying a store to another machine or before serving it for a long time.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from engram.serve.export import read_manifest
from engram.serve.identity import digest_of_sums
from engram.store.disk import DiskStore

__all__ = ["LayerCheck", "StoreCheck", "verify_store_dir"]

_SHOW = 8  # bad row ids named per layer in the summary


@dataclass
class LayerCheck:
    """What checking one layer's file found: ``problem`` (a header, layout or manifest mismatch that kept
    its rows from being checked, or a wrong digest) and the rows whose bytes fail their checksum."""

    layer: int
    file: Path
    rows: int = 0
    bytes: int = 0
    bad_count: int = 0
    bad_rows: list[int] = field(default_factory=list)  # logical ids, sorted (all of them up to a million)
    problem: str | None = None

    @property
    def ok(self) -> bool:
        return self.problem is None and self.bad_count == 0


@dataclass
class StoreCheck:
    """The result of :func:`verify_store_dir`: one :class:`LayerCheck` per layer of the manifest."""

    store_dir: Path
    layers: list[LayerCheck]

    @property
    def ok(self) -> bool:
        return all(lc.ok for lc in self.layers)

    def summary(self) -> str:
        """One line: what was checked when clean, else every layer's problem and (a few of) its bad rows."""
        rows, nbytes = sum(lc.rows for lc in self.layers), sum(lc.bytes for lc in self.layers)
        if self.ok:
            return (f"store {self.store_dir}: OK, {len(self.layers)} layers, {rows:,} rows ({nbytes / 2**20:,.1f} MiB) "
                    f"match their checksums; headers, layouts and manifest consistent")
        parts = []
        for lc in self.layers:
            if lc.problem is not None:
                parts.append(f"layer {lc.layer} ({lc.file.name}): {lc.problem}")
            if lc.bad_count:
                shown = ", ".join(map(str, lc.bad_rows[:_SHOW]))
                more = f" and {lc.bad_count - _SHOW} more" if lc.bad_count > _SHOW else ""
                parts.append(f"layer {lc.layer} ({lc.file.name}): {lc.bad_count} row{'s' if lc.bad_count > 1 else ''} "
                             f"fail their checksum: {shown}{more}")
        bad = sum(lc.bad_count for lc in self.layers)
        return f"store {self.store_dir}: {bad:,} corrupted rows of {rows:,} checked; " + "; ".join(parts)


def verify_store_dir(store_dir: str | os.PathLike, *, progress: bool | None = None) -> StoreCheck:
    """Check everything in a store directory; never raises for what it finds (see :class:`StoreCheck`).

    The manifest must be readable (FileNotFoundError / ValueError otherwise: there is nothing to check
    against). Per layer: the file's header, row checksum array and layout sidecar; that it is the
    manifest's (layer, export id, shape, dtype); every row against its checksum; and that the row
    checksums give the table digest the manifest recorded. ``progress``: a tqdm bar over the bytes
    (None: only on a terminal).
    """
    from tqdm import tqdm

    d = Path(store_dir)
    manifest = read_manifest(d)
    checks: list[tuple[LayerCheck, DiskStore | None]] = []
    try:
        for lay, spec in sorted(manifest["layers"].items(), key=lambda kv: int(kv[0])):
            lc = LayerCheck(int(lay), d / str(spec.get("file")))
            store = None
            try:
                store = DiskStore(lc.file, io="mmap", expect={
                    "num_rows": spec["num_rows"], "dim": manifest["dim"], "dtype": manifest["dtype"],
                    "meta": {"layer": int(lay), "export_id": manifest["export_id"]}})
            except FileNotFoundError:
                lc.problem = "file listed in the manifest is missing"
            except (ValueError, OSError) as e:  # StoreFormatError among them
                lc.problem = str(e).removeprefix(f"{lc.file}: ")
            checks.append((lc, store))
        total = sum(s.nbytes for _, s in checks if s is not None)
        with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="verify",
                  disable=None if progress is None else not progress) as bar:
            for lc, s in checks:
                if s is None:
                    continue
                bar.set_postfix_str(f"layer {lc.layer}")
                lc.bad_count, bad = s.scan(progress=bar.update)
                lc.bad_rows, lc.rows, lc.bytes = bad.tolist(), s.num_rows, s.nbytes
                want = (manifest["weights"].get("tables") or {}).get(str(lc.layer))
                if digest_of_sums(s.row_sums()) != want:
                    lc.problem = ("its row checksums do not give the table digest the manifest records: the "
                                  "manifest or the file belongs to another export")
    finally:
        for _, s in checks:
            if s is not None:
                s.close()
    return StoreCheck(d, [lc for lc, _ in checks])
