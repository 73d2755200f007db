"""Which weights a store was exported from: digests recorded at export, compared whenever a store is opened.

The manifest's ``weights`` entry holds, per Engram layer, a digest of the exact table bytes the store
holds, and a digest of the backbone (every other tensor) of the model it was exported from:

* table digest: sha256 of the table's per-row CRC32C values in row-id order (uint32 little-endian).
  Those are the checksums the store keeps beside its rows and checks on every read, so the digest is
  read from the store's own files, costs no pass over the rows at export, and ties what is served to
  what was exported: a row that differs changes its CRC (but for a 2**-32 chance) and so the digest.
* backbone digest: sha256 over every non-table tensor's name, dtype, shape and CRC32C of its bytes.
* source table digest (fp8 stores only, ``weights.source_tables``): the table digest of the float
  table the stored rows were quantised from; it is what a model's tables are compared against then.

Opening a store for a model compares the tables when the model has them (in RAM, or in its model
directory, either layout, which is then streamed: bounded memory, roughly the time to read the file) and the backbone
otherwise, and refuses a mismatch naming both digests: a store exported one training step before the
model is refused, not served. When the tables match, a different backbone is accepted (a backbone
fine-tuned over frozen tables serves the very same rows).
"""

# Shapes: R rows of one layer's table, d row width, n rows of one streamed piece.

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch

from engram.model.sharded_tables import holds_table, iter_table_rows
from engram.model.transformer import EngramLM, engram_table_key
from engram.store.checksum import crc32c, row_crcs
from engram.store.format import RAW_TORCH

__all__ = ["backbone_digest", "check_identity", "digest_of_sums", "model_table_digests", "raw_row_crcs",
           "weights_table_digests"]

_PIECE_BYTES = 64 << 20  # table bytes hashed per piece when streaming from a weights file


def digest_of_sums(sums_R: np.ndarray) -> str:
    """The table digest of per-row CRC32C values in row-id order (see the module docstring)."""
    return "sha256:" + hashlib.sha256(np.ascontiguousarray(sums_R, dtype="<u4").tobytes()).hexdigest()


def _raw(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu().contiguous()
    t = t.reshape(1) if t.dim() == 0 else t  # a 0-d tensor has no byte view
    return t.view(RAW_TORCH[t.dtype]).numpy() if t.dtype in RAW_TORCH else t.view(torch.uint8).numpy()


def raw_row_crcs(rows: torch.Tensor) -> np.ndarray:
    """CRC32C of each row's bytes (uint32 ``[n]``): the per-row sums a table digest is made of."""
    return row_crcs(_raw(rows))


def _table_digest(pieces) -> str:
    return digest_of_sums(np.concatenate([raw_row_crcs(p) for p in pieces]))


def model_table_digests(model: EngramLM) -> dict[int, str]:
    """``{layer: table digest}`` of the tables a model holds in memory (it must have them)."""
    out = {}
    for blk in model.blocks:
        if blk.engram is not None:
            w = blk.engram.table.weight
            step = max(1, _PIECE_BYTES // (w.shape[1] * w.element_size()))
            out[blk.layer] = _table_digest(w[a:a + step] for a in range(0, w.shape[0], step))
    return out


def weights_table_digests(weights_path: str | os.PathLike, layers) -> dict[int, str] | None:
    """``{layer: table digest}`` of the Engram tables of a model directory, streamed in pieces (a table
    larger than RAM is never loaded); None when the directory holds none of them.

    ``weights_path``: the model directory or its weights file; the tables are read from wherever the
    directory keeps them (the weights file, or its table shards: :mod:`engram.model.sharded_tables`).
    """
    p = Path(weights_path)
    d = p if p.is_dir() else p.parent
    if not any(holds_table(d, lay) for lay in layers):
        return None
    out = {}
    for lay in layers:
        if not holds_table(d, lay):
            raise ValueError(f"{d} lacks the table of Engram layer {lay} ({engram_table_key(lay)!r})")
        out[int(lay)] = _table_digest(iter_table_rows(d, lay, verify=False, piece_bytes=_PIECE_BYTES))
    return out


def backbone_digest(model: EngramLM) -> str:
    """Digest of every tensor of ``model`` but the Engram tables (see the module docstring)."""
    sd = model.state_dict()
    skip = {engram_table_key(blk.layer) for blk in model.blocks}
    if model.cfg.tie_embeddings:  # the same tensor as the embedding, and not saved either
        skip.add("lm_head.weight")
    h = hashlib.sha256()
    for name in sorted(set(sd) - skip):
        t = sd[name]
        crc = crc32c(_raw(t).reshape(-1)) if t.numel() else 0
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|{crc:08x}\n".encode())
    return "sha256:" + h.hexdigest()


def _short(digest: str) -> str:
    return digest.removeprefix("sha256:")[:16]


def check_identity(manifest: dict, model: EngramLM, where: str, weights_path: str | os.PathLike | None = None,
                   model_name: str = "the model") -> None:
    """Raise ValueError unless the store's recorded weights are ``model``'s (see the module docstring).

    The tables are compared when ``model`` holds them or ``weights_path`` (its weights file) does; else
    the backbone. ``where`` and ``model_name`` name the two sides in the message.
    """
    rec = manifest.get("weights") or {}
    # a quantised (fp8) store stores other bytes than the model's tables: compare the tables it was made from
    tables = {int(k): v for k, v in (rec.get("source_tables") or rec.get("tables") or {}).items()}
    layers = sorted(tables)
    if model.has_tables:
        got, source = model_table_digests(model), f"{model_name} (its tables in memory)"
    else:
        got = weights_table_digests(weights_path, layers) if weights_path is not None else None
        source = f"{model_name} ({weights_path})"
    if got is not None:
        for lay in layers:
            if got.get(lay) != tables[lay]:
                raise ValueError(f"{where} was exported from weights {_short(tables[lay])} (layer {lay} table), "
                                 f"{source} has {_short(got.get(lay, 'none'))}: its rows are not this model's; "
                                 f"export the store again from this model (engram export-memory)")
        return
    want, have = rec.get("backbone"), backbone_digest(model)
    if want != have:
        raise ValueError(f"{where} was exported from weights with backbone {_short(str(want))}, {source} has "
                         f"{_short(have)} and no tables to compare: the store belongs to another model or "
                         f"training step; export it again from this model (engram export-memory)")
