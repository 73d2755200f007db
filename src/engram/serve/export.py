"""Export a model's Engram tables to a store directory, and open such a directory for serving.

A store directory holds::

    layer_<i>.engram   one row store per Engram layer i (layout: engram.store.format), the layer's
                       flat [num_rows, d] table with every hash head side by side (MultiHeadTable order)
    manifest.json      what the directory holds and for which model; written last, atomically

The manifest records the model config (and its sha256), a hash of the tokenizer's compression map (row
ids depend on both), the layers with their head sizes, the row width and dtype, a random export id
that every layer file also carries in its header, and the identity of the exact weights exported
(:mod:`engram.serve.identity`: a digest of each table's bytes and one of the backbone). Opening checks
all of it against the model, so a store of another model, of another tokenizer, of the same model at
another training step, or a mix of files from two exports gives a clear error instead of wrong rows.
Exporting removes an old manifest first and writes the new one only after every layer file is
durable (each is written crash-safely by :func:`write_store`), so an interrupted export never leaves a
directory that opens as valid.

With ``dtype="fp8"`` the tables are quantised on the way out (:func:`engram.v41.quantize_fp8_rows`:
float8_e4m3fn values, one power-of-two scale per 32 channels) into fp8 stores (engram.store.fp8rows),
which serve the dequantised rows in the model's table dtype. The manifest's ``dtype`` is then
``float8_e4m3fn``, its table digests are those of the stored fp8 rows (what ``engram verify`` checks),
and ``weights.source_tables`` records the digests of the float tables they were quantised from, which
is what identifies the model when the store is opened.

With ``layouts`` (see :func:`co_access_layouts` and :mod:`engram.store.layout`), a layer file stores its
rows in co-access order and names a sidecar ``layer_<i>.engram.layout-<id>.npy`` holding that order:
the rows one n-gram looks up sit side by side, so a cold n-gram costs one disk read instead of K.
"""

# Shapes: R rows of one layer's table, d row width, n rows of one streamed piece.

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from engram.atomic import atomic_write, replace_dir
from engram.model.sharded_tables import iter_table_rows
from engram.model.transformer import EngramLM
from engram.serve.identity import backbone_digest, check_identity, digest_of_sums, raw_row_crcs
from engram.store.base import write_store
from engram.store.disk import DiskStore
from engram.store.format import DTYPE_NAMES, FP8
from engram.store.fp8rows import Fp8Rows, pack_fp8_rows
from engram.store.layout import CoAccessCounter, RowLayout, remove_stale_layouts, write_store_with_layout

__all__ = ["MANIFEST", "check_manifest", "co_access_layouts", "config_hash", "dequantized", "export_tables",
           "layer_file", "layer_meta", "open_store_dir", "read_manifest", "vocab_hash", "write_manifest"]

MANIFEST = "manifest.json"
FP8_NAME = DTYPE_NAMES[FP8]
EXPORT_DTYPES = ("fp8",)  # besides the model's own table dtype (the default)
FORMAT, VERSION = "engram-memory", 2
_PIECE_BYTES = 64 << 20  # rows streamed per piece when exporting from a weights file


def layer_file(layer: int) -> str:
    """File name of layer ``layer``'s store inside a store directory."""
    return f"layer_{int(layer)}.engram"


def config_hash(cfg) -> str:
    """sha256 of a ModelConfig's canonical JSON."""
    return hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True).encode()).hexdigest()


def vocab_hash(vocab) -> str:
    """sha256 of a CompressedVocab's id map (the hashing depends on it)."""
    return hashlib.sha256(np.ascontiguousarray(vocab.lookup, dtype="<i8").tobytes()).hexdigest()


def _engrams(model: EngramLM) -> dict:
    if model.hasher is None:
        raise ValueError("the model has no Engram layers: there are no tables to export or serve")
    return {blk.layer: blk.engram for blk in model.blocks if blk.engram is not None}


def _layout(model: EngramLM) -> dict:
    """The manifest fields that describe a model's tables (everything except the export id)."""
    engrams = _engrams(model)
    first = next(iter(engrams.values()))
    return {"format": FORMAT, "version": VERSION, "config_hash": config_hash(model.cfg),
            "vocab_hash": vocab_hash(model.vocab), "dim": first.head_dim, "dtype": DTYPE_NAMES[first.table_dtype],
            "layers": {str(lay): {"file": layer_file(lay), "num_rows": e.num_rows, "head_sizes": list(e.head_sizes)}
                       for lay, e in sorted(engrams.items())},
            "model_config": model.cfg.to_dict()}


def layer_meta(model: EngramLM, layer: int, export_id: str) -> dict:
    """Header meta of layer ``layer``'s store file (what :func:`open_store_dir` expects to find)."""
    return {"layer": int(layer), "export_id": export_id, "config_hash": config_hash(model.cfg)}


def write_manifest(out_dir: str | os.PathLike, model: EngramLM, export_id: str, *, dtype: str | None = None,
                   source_tables: dict | None = None) -> Path:
    """Write ``manifest.json`` for ``model`` atomically (temp file, fsync, rename, fsync of the directory).

    For writers that produce the layer files themselves (e.g. a synthetic table far larger than RAM):
    write every ``layer_file(i)`` with ``meta=layer_meta(model, i, export_id)`` first, then call this.
    The table digests are read from those files (their row checksums), the backbone's from ``model``.
    ``dtype``: the stores' dtype when it is not the model's (``float8_e4m3fn``), with ``source_tables``
    ``{layer: digest}`` of the float tables the stored rows were quantised from.
    """
    out = Path(out_dir)
    layout = _layout(model)
    if dtype is not None:
        layout["dtype"] = dtype
    tables = {}
    for lay, spec in layout["layers"].items():
        with DiskStore(out / spec["file"], io="mmap", expect={"meta": {"export_id": export_id}}) as s:
            tables[lay] = digest_of_sums(s.row_sums())
    weights = {"tables": tables, "backbone": backbone_digest(model)}
    if source_tables is not None:
        weights["source_tables"] = {str(k): v for k, v in sorted(source_tables.items())}
    manifest = {**layout, "export_id": export_id, "weights": weights}
    return atomic_write(out / MANIFEST, lambda f: f.write(json.dumps(manifest, indent=2) + "\n"), mode="w")


def co_access_layouts(model: EngramLM, id_batches: Iterable[torch.Tensor]) -> dict[int, RowLayout]:
    """Per-layer co-access layouts ``{layer: RowLayout}`` from token-id batches (a profile corpus).

    Each position's K head rows of each n-gram order form a group; the groups seen, most frequent first,
    decide the file order (:func:`engram.store.layout.co_access_order`). Profile on data other than what
    is then evaluated (e.g. the train split). The rows read back are the same whatever the layout.
    """
    engrams = _engrams(model)
    counters = {lay: CoAccessCounter(eng.num_rows) for lay, eng in engrams.items()}
    for x in id_batches:  # streamed: memory grows with the distinct n-grams, not with the corpus
        rows = model.engram_rows(x)
        for lay, eng in engrams.items():
            flat = eng.flat_rows(rows[lay]).reshape(-1, eng.max_ngram_size - 1, eng.n_head_per_ngram).numpy()
            for o in range(flat.shape[1]):
                counters[lay].add(flat[:, o])
    return {lay: RowLayout(counters[lay].order(), eng.num_rows) for lay, eng in engrams.items()}


def _check_layouts(layouts: dict | None, engrams: dict) -> dict[int, RowLayout]:
    out = {}
    for lay, lo in (layouts or {}).items():
        if int(lay) not in engrams:
            raise ValueError(f"layout given for layer {lay}, which has no Engram table (layers {sorted(engrams)})")
        eng = engrams[int(lay)]
        lo = lo if isinstance(lo, RowLayout) else RowLayout(lo, eng.num_rows)
        if lo.num_rows != eng.num_rows:
            raise ValueError(f"layer {lay}: layout is for {lo.num_rows} rows, the table has {eng.num_rows}")
        out[int(lay)] = lo
    return out


def export_tables(model: EngramLM | str | os.PathLike, out_dir: str | os.PathLike, *,
                  layouts: dict[int, RowLayout | np.ndarray] | None = None, dtype: str | None = None) -> Path:
    """Write every Engram table of ``model`` to the store directory ``out_dir``; returns ``out_dir``.

    ``model`` is an :class:`EngramLM` with its tables, or a model directory (``save_pretrained``, or a
    sharded-tables one: :mod:`engram.model.sharded_tables`), whose tables are streamed from its files in
    pieces, each checked against the directory's checksums, so a table larger than RAM is never loaded.
    Both layouts of the same weights give the same store (rows, row checksums, manifest digests).
    ``layouts``: ``{layer: RowLayout}`` (or placed row ids) to store those layers' rows in that order, e.g.
    from :func:`co_access_layouts`; from a model directory the layer is first written in id order, then
    rewritten from that file in layout order (twice the writing, never the table in RAM).
    ``dtype``: None stores the tables as they are; ``"fp8"`` quantises them (see the module docstring).
    """
    if dtype is not None and dtype not in EXPORT_DTYPES:
        raise ValueError(f"export dtype must be one of {', '.join(EXPORT_DTYPES)} (or None: the model's own), "
                         f"got {dtype!r}")
    out = Path(out_dir)
    if isinstance(model, EngramLM):
        if not model.has_tables:
            raise ValueError("the model was built without its tables (tables=False): export from the model "
                             "directory, or from a model that holds them")
        src_model, weights = model, None
    else:
        src_model, weights = EngramLM.from_pretrained(model, tables=False), Path(model)
    engrams = _engrams(src_model)
    layouts = _check_layouts(layouts, engrams)
    final = out
    if (final / MANIFEST).exists():
        # Replacing a store: write the new one next to it and swap it in at the end, so a failed or
        # killed export leaves the previous store exactly as it was.
        out = final.with_name(f".{final.name}.export-{os.getpid()}")
        shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    try:
        _export_into(out, src_model, weights, engrams, layouts, fp8=dtype == "fp8")
    except BaseException:
        if out != final:
            shutil.rmtree(out, ignore_errors=True)
        raise
    if out != final:
        replace_dir(out, final)
    return final


class _Fp8Pieces:
    """Quantise float row pieces to packed fp8 rows as they stream by, keeping the CRC32C of each
    source row (the source table's digest, recorded in the manifest)."""

    def __init__(self, pieces) -> None:
        self.pieces, self.sums = pieces, []

    def __iter__(self):
        from engram.v41.fp8 import quantize_fp8_rows

        for p in self.pieces:
            self.sums.append(raw_row_crcs(p))
            yield pack_fp8_rows(*quantize_fp8_rows(p))

    def digest(self) -> str:
        return digest_of_sums(np.concatenate(self.sums))


def _quantized(rows: torch.Tensor) -> torch.Tensor:
    from engram.v41.fp8 import quantize_fp8_rows

    return pack_fp8_rows(*quantize_fp8_rows(rows))


def _export_into(out: Path, src_model: EngramLM, model_dir: Path | None, engrams: dict, layouts: dict, *,
                 fp8: bool = False) -> None:
    """Write the layer files and, last, the manifest into ``out``; the tables from ``src_model``, or
    streamed from the model directory ``model_dir`` (either layout) when given; quantised with ``fp8``."""
    export_id = uuid.uuid4().hex
    sources: dict[int, str] = {}
    for lay, eng in sorted(engrams.items()):
        R, d = eng.num_rows, eng.head_dim  # a tables=False load checked the file's shapes against these
        dtype, path = FP8 if fp8 else eng.table_dtype, out / layer_file(lay)
        meta = layer_meta(src_model, lay, export_id)
        if model_dir is None:
            table = eng.table.weight.detach().cpu()
            step = max(1, _PIECE_BYTES // (d * table.element_size()))
            pieces = (table[a:a + step] for a in range(0, R, step))
        else:
            # That load left the table unread, so unverified: every piece is checked against the
            # directory's checksums as it streams by, one file (shard) after another, never all of it.
            table, pieces = None, iter_table_rows(model_dir, lay, piece_bytes=_PIECE_BYTES)
        if fp8:
            pieces = _Fp8Pieces(pieces)
        if table is not None and lay in layouts:  # rows in RAM: written in layout order directly
            take = (lambda ids, t=table: _quantized(t[torch.from_numpy(ids)])) if fp8 else \
                (lambda ids, t=table: t[torch.from_numpy(ids)])
            if fp8:
                sources[lay] = digest_of_sums(np.concatenate([raw_row_crcs(p) for p in pieces.pieces]))
            write_store_with_layout(path, take, layouts[lay], dim=d, dtype=dtype, meta=meta)
            continue
        write_store(path, iter(pieces), num_rows=R, dim=d, dtype=dtype, meta=meta)
        if fp8:
            sources[lay] = pieces.digest()
        if lay in layouts:  # rewrite from the id-ordered file: the layout needs random access
            with DiskStore(path, io="mmap") as src:
                write_store_with_layout(path, lambda i, s=src: s.gather(torch.from_numpy(i)), layouts[lay], dim=d,
                                        dtype=dtype, meta=meta)
                src.drop_page_cache()
    for lay in engrams:
        remove_stale_layouts(out / layer_file(lay))
    write_manifest(out, src_model, export_id, dtype=FP8_NAME if fp8 else None, source_tables=sources if fp8 else None)


def read_manifest(store_dir: str | os.PathLike) -> dict:
    """The parsed ``manifest.json`` of a store directory; FileNotFoundError / ValueError say what is wrong."""
    d = Path(store_dir)
    if not d.is_dir():
        raise FileNotFoundError(f"store directory {d} does not exist (write one with `engram export-memory`)")
    path = d / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"no {MANIFEST} in {d}: not a store directory, or an export that did not finish")
    try:
        m = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        got = m.get("format") if isinstance(m, dict) else type(m).__name__
        raise ValueError(f"{path} is not an Engram store manifest (format {got!r}, expected {FORMAT!r})")
    if m.get("version") != VERSION:
        raise ValueError(f"{path} has manifest version {m.get('version')}, this code reads version {VERSION}: "
                         f"export the store again with this version of engram (engram export-memory)")
    missing = {"config_hash", "vocab_hash", "dim", "dtype", "layers", "export_id", "weights"} - set(m)
    if missing:
        raise ValueError(f"{path} lacks fields {sorted(missing)}")
    w = m["weights"]
    if not (isinstance(w, dict) and isinstance(w.get("tables"), dict) and isinstance(w.get("backbone"), str)):
        raise ValueError(f"{path}: its 'weights' entry is malformed (expected table and backbone digests)")
    return m


def _config_diffs(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        x, y = a.get(k, "<missing>"), b.get(k, "<missing>")
        if isinstance(x, dict) and isinstance(y, dict):
            out += _config_diffs(x, y, f"{prefix}{k}.")
        elif x != y:
            out.append(f"{prefix}{k}: store {x!r} vs model {y!r}")
    return out


def check_manifest(manifest: dict, model: EngramLM, where: str = "store") -> None:
    """Raise ValueError listing every way ``manifest`` does not fit ``model``."""
    if manifest.get("flavour") is not None:
        raise ValueError(f"{where} holds the Engram tables of a {manifest['flavour']!r} checkpoint (engram "
                         "import-v41), not of an EngramLM: serve it with engram.serve.v41.open_v41_store")
    want = _layout(model)
    problems = []
    if manifest["config_hash"] != want["config_hash"]:
        diffs = _config_diffs(manifest.get("model_config") or {}, want["model_config"])
        problems.append("model config differs" + (f" ({'; '.join(diffs[:6])})" if diffs else ""))
    if manifest["vocab_hash"] != want["vocab_hash"]:
        problems.append("the tokenizer's compression map differs (row ids would not match)")
    for key in ("dim", "dtype"):
        if key == "dtype" and manifest[key] == FP8_NAME:
            continue  # fp8 rows are dequantised to the model's table dtype on lookup
        if manifest[key] != want[key]:
            problems.append(f"{key} is {manifest[key]!r}, the model needs {want[key]!r}")
    if sorted(manifest["layers"]) != sorted(want["layers"]):
        problems.append(f"layers {sorted(manifest['layers'], key=int)} vs the model's Engram layers "
                        f"{sorted(want['layers'], key=int)}")
    else:
        for lay, spec in want["layers"].items():
            got = manifest["layers"][lay]
            for key in ("num_rows", "head_sizes"):
                if got.get(key) != spec[key]:
                    problems.append(f"layer {lay}: {key} {got.get(key)} vs the model's {spec[key]}")
    if problems:
        raise ValueError(f"{where} does not fit this model: " + "; ".join(problems))


def open_store_dir(store_dir: str | os.PathLike, model: EngramLM, *, verify: str = "header",
                   io: str = "auto", weights: str | os.PathLike | None = None, packed: bool = False) -> dict:
    """Open every layer's :class:`DiskStore` of a store directory, after checking it fits ``model``.

    Checks the manifest against the model's config and tokenizer, and the exported weights' identity
    against the model's (:func:`engram.serve.identity.check_identity`: its tables, from memory or from
    ``weights``, its weights file, when either holds them; else its backbone). ``verify="full"`` also
    checks every row against its checksum (reads all files); rows are checked whenever they are read
    anyway. ``io``: see :class:`DiskStore`. Raises FileNotFoundError for a missing directory, manifest or
    layer file, and ValueError (StoreFormatError for a damaged file) naming what does not match.

    An fp8 store's layers come as :class:`~engram.store.fp8rows.Fp8Rows` over the DiskStore, serving
    rows dequantised to the model's table dtype; with ``packed`` as the bare DiskStores of packed rows
    (to put a cache in front that holds packed rows; :func:`dequantized` wraps them afterwards).
    """
    d = Path(store_dir)
    manifest = read_manifest(d)
    check_manifest(manifest, model, where=f"store {d}")
    check_identity(manifest, model, f"store {d}", weights)
    dtype = next(iter(_engrams(model).values())).table_dtype
    stores: dict = {}
    try:
        for lay, spec in sorted(manifest["layers"].items(), key=lambda kv: int(kv[0])):
            path = d / spec["file"]
            if not path.is_file():
                raise FileNotFoundError(f"store {d} lacks {spec['file']} (layer {lay}) listed in its manifest")
            stores[int(lay)] = DiskStore.open(path, verify=verify, expect={
                "num_rows": spec["num_rows"], "dim": manifest["dim"],
                "dtype": FP8 if manifest["dtype"] == FP8_NAME else dtype,
                "meta": {"layer": int(lay), "export_id": manifest["export_id"]}}, io=io)
    except BaseException:
        for s in stores.values():
            s.close()
        raise
    return stores if packed else dequantized(stores, model)


def dequantized(stores: dict, model: EngramLM) -> dict:
    """``stores`` with every store of packed fp8 rows (uint8) wrapped in an :class:`Fp8Rows` that
    dequantises to the model's table dtype; float stores are returned as they are."""
    engrams = _engrams(model)
    return {lay: Fp8Rows(s, engrams[lay].head_dim, engrams[lay].table_dtype) if s.dtype == torch.uint8 else s
            for lay, s in stores.items()}
