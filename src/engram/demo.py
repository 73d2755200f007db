"""A short tour of the core: compress a bundled tokenizer, hash a sentence, run the module.

Runs in well under a minute on a laptop CPU and needs no download.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from engram.config import engram_preset
from engram.hashing import NgramHasher
from engram.model import Engram
from engram.tokenizer import CompressedVocab

PAPER_RATIO = 0.2343  # the paper's reduction on its 128k vocabulary
SENTENCE = "Only Alexander the Great could tame the horse Bucephalus."


def run(tokenizer: str = "mistral-tekken", out=print) -> dict:
    torch.manual_seed(0)
    t0 = time.perf_counter()
    vocab = CompressedVocab.from_pretrained(tokenizer)
    stats = vocab.stats(top=5)
    out(f"[1/3] vocabulary compression of {tokenizer!r} ({time.perf_counter() - t0:.1f}s)")
    out(f"      {stats['original_size']:,} ids -> {stats['compressed_size']:,} compressed ids: "
        f"{stats['ratio']:.2%} smaller (paper: {PAPER_RATIO:.2%} on a 128k vocabulary)")
    for g in stats["top_groups"]:
        toks = ", ".join(repr(t) for t in g["tokens"][:6])
        out(f"      {g['key']!r:>6} <- {g['size']:3d} tokens: {toks}, ...")

    cfg = engram_preset("engram-demo")
    hasher = NgramHasher.from_config(cfg, vocab)
    ids = vocab.tokenizer(SENTENCE).input_ids
    comp = vocab(np.array([ids]))
    rows = hasher.hash(torch.from_numpy(comp))
    out(f"[2/3] hashing {SENTENCE!r}: {len(ids)} tokens, layers {cfg.layer_ids}, "
        f"N={cfg.max_ngram_size}, {cfg.n_head_per_ngram} heads/order")
    pieces = vocab.tokenizer.convert_ids_to_tokens(ids)
    lay = cfg.layer_ids[0]
    for t in range(min(4, len(ids))):
        out(f"      t={t} {pieces[t]!r:>12} -> layer {lay} rows {rows[lay][0, t, :4].tolist()} ...")
    w = hasher.new_window(1)
    for t, c in enumerate(comp[0]):
        step = hasher.hash_step(hasher.push(w, c))
        assert np.array_equal(step[lay][0], rows[lay][0, t].numpy())
    out("      incremental (one token at a time) == batch: ok")

    D, M = 256, 4
    module = Engram(D, hasher.head_sizes(lay), max_ngram_size=cfg.max_ngram_size,
                    n_head_per_ngram=cfg.n_head_per_ngram, n_embed_per_ngram=cfg.n_embed_per_ngram,
                    hc_mult=M, conv_init="default")
    h = torch.randn(1, len(ids), M, D)
    with torch.no_grad():
        y, aux = module(h, rows[lay], return_gates=True)
        # decode token by token with the conv state: must equal the full forward
        state, parts = None, []
        for t in range(len(ids)):
            yt, a = module(h[:, t:t + 1], rows[lay][:, t:t + 1], conv_state=state, return_state=True)
            state = a["conv_state"]
            parts.append(yt)
        err = (torch.cat(parts, 1) - y).abs().max().item()
    n_mem = module.table.num_rows * module.table.dim
    out(f"[3/3] Engram module: D={D}, M={M} branches, table {module.table.num_rows:,} rows x "
        f"{module.table.dim} = {n_mem / 1e6:.1f}M memory parameters")
    out(f"      output {tuple(y.shape)}, gates (branch 0) {[round(g, 2) for g in aux['gates'][0, :, 0].tolist()]}")
    out(f"      incremental decode vs full forward: max |diff| = {err:.2e}")
    return {"ratio": stats["ratio"], "compressed_size": stats["compressed_size"], "decode_err": err}
