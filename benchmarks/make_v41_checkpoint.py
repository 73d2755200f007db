"""Write a synthetic checkpoint in DeepSeek-V4.1's layout, streaming: the input of `engram import-v41`.

The real checkpoint cannot be downloaded here, so this writes one with the same structure: sharded
safetensors with `model.safetensors.index.json`, a composite `config.json` with the released field
names (under `text_config`), and per Engram layer `layers.{i}.engram.embed.weight` (float8_e4m3fn
[rows, head_dim]) + `.embed.scale` (float8_e8m0fnu [rows, head_dim/32]) in a shard of their own (as
the release keeps its two tables in the last two shards), plus `.wkv.weight`, `.q_weight`,
`.k_weight` and a few non-Engram tensors in a first shard. Table rows are random bytes (NaN codes
replaced) with scales between 2**-6 and 2**6, written chunk by chunk with a hand-streamed safetensors
file (8-byte header length, JSON header, then the data), so a table larger than RAM is never held.

--size tiny: a few hundred KiB (tests); --size bench: the released widths (hidden 5120, hc 4, N 4,
8 heads, head_dim 256, layers [1, 14]) with tables of --gb GiB in all (default 33, over 32 GB).

    python benchmarks/make_v41_checkpoint.py --out CKPT --size tiny
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import sys
from pathlib import Path

import numpy as np

TINY = dict(hidden_size=64, hc_mult=2, engram_layer_ids=[1, 3], engram_max_ngram_size=3, engram_vocab_size=101,
            engram_n_heads=2, engram_head_dim=64, engram_pad_id=0, engram_compressed_vocab_size=40)
BENCH = dict(hidden_size=5120, hc_mult=4, engram_layer_ids=[1, 14], engram_max_ngram_size=4,
             engram_vocab_size=16000000, engram_n_heads=8, engram_head_dim=256, engram_pad_id=0,
             engram_compressed_vocab_size=129280)
_CHUNK_BYTES = 64 << 20


def engram_config(size: str, gb: float | None = None) -> dict:
    """The text config's Engram fields; for bench, engram_vocab_size is set so the tables total ``gb`` GiB."""
    from engram.v41 import V41Config, bucket_primes

    base = dict(TINY if size == "tiny" else BENCH)
    if size == "bench" and gb is not None:
        n_cols = (base["engram_max_ngram_size"] - 1) * base["engram_n_heads"]
        row_bytes = base["engram_head_dim"] * 33 // 32
        rows_per_layer = gb * 2**30 / (row_bytes * len(base["engram_layer_ids"]))
        base["engram_vocab_size"] = max(101, int(rows_per_layer / n_cols))
    probe = V41Config(**base, engram_num_embeddings=[1] * len(base["engram_layer_ids"]))
    return {**base, "engram_num_embeddings": [sum(p) for p in bucket_primes(probe)], "rms_norm_eps": 1e-20}


def _header(tensors: list[tuple[str, str, list[int]]]) -> tuple[bytes, list[int]]:
    """Safetensors header bytes (length + JSON, padded to 8) and each tensor's byte size, in order."""
    sizes = {"F8_E4M3": 1, "F8_E8M0": 1, "BF16": 2, "F32": 4}
    meta, off, nbytes = {"__metadata__": {"format": "pt"}}, 0, []
    for name, dtype, shape in tensors:
        n = int(np.prod(shape)) * sizes[dtype]
        meta[name] = {"dtype": dtype, "shape": shape, "data_offsets": [off, off + n]}
        off += n
        nbytes.append(n)
    body = json.dumps(meta, separators=(",", ":")).encode()
    body += b" " * (-len(body) % 8)
    return struct.pack("<Q", len(body)) + body, nbytes


def _write_shard(path: Path, tensors: list[tuple[str, str, list[int]]], chunks) -> int:
    """Write one shard; ``chunks(i)`` yields tensor i's bytes in pieces. Returns the data bytes."""
    head, nbytes = _header(tensors)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(head)
        for i, n in enumerate(nbytes):
            got = 0
            for piece in chunks(i):
                f.write(piece)
                got += len(piece)
                if hasattr(os, "posix_fadvise") and got % (256 << 20) < len(piece):
                    f.flush()
                    os.fdatasync(f.fileno())
                    os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            assert got == n, (tensors[i][0], got, n)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return sum(nbytes)


def _fp8_rows(rng: np.random.Generator, rows: int, width: int):
    step = max(1, _CHUNK_BYTES // width)
    for a in range(0, rows, step):
        buf = np.frombuffer(rng.bytes(min(step, rows - a) * width), dtype=np.uint8).copy()
        buf[(buf & 0x7F) == 0x7F] = 0  # e4m3 has NaN at 0x7F / 0xFF and no infinities
        yield buf.tobytes()


def _scales(rng: np.random.Generator, rows: int, blocks: int):
    step = max(1, _CHUNK_BYTES // blocks)
    for a in range(0, rows, step):
        yield rng.integers(127 - 6, 127 + 7, size=min(step, rows - a) * blocks, dtype=np.uint8).tobytes()


def _bf16(rng: np.random.Generator, shape, std: float):
    """Normal bf16 values (std ``std``) in pieces of leading rows."""
    import torch

    inner = int(np.prod(shape[1:]))
    step = max(1, (_CHUNK_BYTES // 4) // max(1, inner))
    for a in range(0, shape[0], step):
        n = min(step, shape[0] - a)
        t = torch.from_numpy(rng.standard_normal((n, inner), dtype=np.float32) * std).to(torch.bfloat16)
        yield t.view(torch.int16).numpy().tobytes()


def write_checkpoint(out: str | os.PathLike, size: str = "tiny", gb: float | None = None, seed: int = 0,
                     prefix: str = "") -> dict:
    """Write the checkpoint into ``out``; returns {"table_bytes", "total_bytes", "shards", "config"}.

    prefix: put before every tensor name (the release has none; a transformers save has ``model.``)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    eng = engram_config(size, gb)
    D, H, E = eng["hidden_size"], eng["hc_mult"], eng["engram_head_dim"]
    C = (eng["engram_max_ngram_size"] - 1) * eng["engram_n_heads"]
    rng = np.random.default_rng(seed)
    layers = eng["engram_layer_ids"]
    n_shards = 1 + len(layers)
    names = [f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors" for i in range(n_shards)]
    weight_map, total, table_bytes = {}, 0, 0

    # shard 1: dense weights of every Engram layer and a few other tensors the importer must skip
    # a token-embedding stand-in of 1024 rows: the importer only has to skip it, its size is beside the point
    dense = [("embed.weight", "BF16", [1024, D], 0.02),
             ("layers.0.attn_norm.weight", "BF16", [D], 1.0)]
    for lay in layers:
        dense += [(f"layers.{lay}.engram.wkv.weight", "BF16", [D * (H + 1), C * E], 0.02),
                  (f"layers.{lay}.engram.q_weight", "BF16", [H, D], 1.0),
                  (f"layers.{lay}.engram.k_weight", "BF16", [H, D], 1.0)]
    dense = [(prefix + n, *rest) for n, *rest in dense]
    specs = [(n, dt, shape) for n, dt, shape, _ in dense]
    total += _write_shard(out / names[0], specs, lambda i: _bf16(rng, dense[i][2], dense[i][3]))
    weight_map.update(dict.fromkeys((n for n, *_ in dense), names[0]))

    for k, lay in enumerate(layers):
        rows = eng["engram_num_embeddings"][k]
        specs = [(f"{prefix}layers.{lay}.engram.embed.weight", "F8_E4M3", [rows, E]),
                 (f"{prefix}layers.{lay}.engram.embed.scale", "F8_E8M0", [rows, E // 32])]
        lrng = np.random.default_rng([seed, lay])
        written = _write_shard(out / names[k + 1], specs,
                               lambda i, r=rows, g=lrng: _fp8_rows(g, r, E) if i == 0 else _scales(g, r, E // 32))
        total += written
        table_bytes += written
        weight_map.update(dict.fromkeys((n for n, *_ in specs), names[k + 1]))

    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    config = {"architectures": ["DeepseekV41ForCausalLM"], "model_type": "deepseek_v41",
              "text_config": {"model_type": "deepseek_v41_text", "vocab_size": eng["engram_compressed_vocab_size"],
                              "num_hidden_layers": max(layers) + 1, **eng}}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return {"table_bytes": table_bytes, "total_bytes": total, "shards": n_shards, "config": eng}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="checkpoint directory to write")
    p.add_argument("--size", choices=["tiny", "bench"], default="tiny", help="tiny (tests) or bench (released widths)")
    p.add_argument("--gb", type=float, default=None, help="bench: total table GiB (default 33)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the rows and weights")
    a = p.parse_args(argv)
    gb = a.gb if a.gb is not None else (33.0 if a.size == "bench" else None)
    info = write_checkpoint(a.out, a.size, gb, a.seed)
    json.dump({k: v for k, v in info.items() if k != "config"}, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
