"""`engram probe memory-off`: what the model still knows with its Engram increments zeroed at inference.

Two probe families pull apart the two jobs the paper gives a model with memory. Memorisation probes ask
for the last token of n-grams that are frequent in the train split (the static, local patterns the
hashed tables are built to hold); in-context probes ask for a token that only an earlier occurrence in
the same context can give (induction over random tokens, which no table can store). If the memory holds
the first kind, silencing it should cost much more on the first family than on the second.
"""

# Shapes: P probes, C context length, n n-gram order.

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from engram.probes.common import memory_off, ngram_windows, top1_hits, unique_ngrams

ORDERS = (3, 4, 5, 6)


@dataclass
class ProbeSet:
    """``x_PC``: contexts; ``target_P``: the token each context should be followed by; ``group_P``: a label per
    probe (the n-gram order for memorisation probes)."""

    name: str
    x_PC: torch.Tensor
    target_P: torch.Tensor
    group_P: np.ndarray


def frequent_ngrams(train: np.ndarray, n: int, top: int, exclude: set[int], tokens: int) -> np.ndarray:
    """The ``top`` most frequent n-grams ``[top, n]`` of the first ``tokens`` train tokens that contain no
    ``exclude`` id (document separators), most frequent first (ties: first seen first)."""
    grams = ngram_windows(train[:tokens], n)
    if exclude and len(grams):
        grams = grams[~np.isin(grams, list(exclude)).any(axis=1)]
    first, _, counts = unique_ngrams(grams)
    order = np.lexsort((first, -counts))[:top]
    return grams[first[order]]


def memorisation_probes(train: np.ndarray, val: np.ndarray, *, context: int, per_order: int = 128, top: int = 64,
                        exclude: set[int] = frozenset(), tokens: int = 1 << 20, seed: int = 0) -> ProbeSet:
    """Occurrences in the validation split of the train split's ``top`` most frequent n-grams (n = 3..6): each
    probe is the ``context`` tokens before an occurrence's last token, which is the target. At most
    ``per_order`` probes per order, drawn with ``seed`` from all occurrences."""
    rng = np.random.default_rng(seed)
    xs, ts, gs = [], [], []
    for n in ORDERS:
        top_grams = frequent_ngrams(train, n, top, exclude, tokens)
        if len(top_grams) == 0:
            continue
        val_grams = ngram_windows(val, n)
        both = np.concatenate([top_grams, val_grams])
        _, inverse, _ = unique_ngrams(both)
        hit = np.isin(inverse[len(top_grams):], inverse[:len(top_grams)])
        ends = np.flatnonzero(hit) + n - 1  # position of each occurrence's last token in val
        ends = ends[ends >= context]
        if len(ends) > per_order:
            ends = np.sort(rng.choice(ends, per_order, replace=False))
        for e in ends:
            xs.append(np.asarray(val[e - context:e], dtype=np.int64))
            ts.append(int(val[e]))
            gs.append(n)
    x = torch.from_numpy(np.stack(xs)) if xs else torch.zeros(0, context, dtype=torch.int64)
    return ProbeSet("memorisation", x, torch.tensor(ts, dtype=torch.int64), np.array(gs, dtype=np.int64))


def induction_probes(vocab: int, *, context: int, count: int = 256, span: int = 3, seed: int = 0,
                     low: int = 16) -> ProbeSet:
    """``count`` contexts of random token ids in ``[low, vocab)``: a span ``A B`` (``span`` tokens, the last
    being B) sits in the first half, and the context ends with ``A`` again, so the target B can only come
    from copying. Random ids keep any n-gram memory from knowing the answer; ``low`` skips the special ids."""
    if context < 2 * span + 2:
        raise ValueError(f"context {context} is too short for a copy span of {span} tokens")
    rng = np.random.default_rng(seed)
    x = rng.integers(low, vocab, size=(count, context), dtype=np.int64)
    targets = np.zeros(count, dtype=np.int64)
    for i in range(count):
        s = rng.integers(0, context // 2 - span)
        a_b = x[i, s:s + span].copy()
        x[i, context - (span - 1):] = a_b[:-1]
        targets[i] = a_b[-1]
        # B must be the only token that ever followed A: redraw filler that happens to repeat A elsewhere
        for j in range(context - span):
            if j != s and np.array_equal(x[i, j:j + span - 1], a_b[:-1]):
                x[i, j] = (x[i, j] + 1 - low) % (vocab - low) + low
    return ProbeSet("in-context", torch.from_numpy(x), torch.from_numpy(targets), np.full(count, span))


def score(model, probes: ProbeSet) -> dict:
    """Top-1 accuracy of ``probes`` with the memory on and off, and the retention ratio off/on."""
    on = top1_hits(model, probes.x_PC, probes.target_P)
    with memory_off(model) as silenced:
        off = top1_hits(model, probes.x_PC, probes.target_P)
    return {"family": probes.name, "probes": len(probes.target_P), **_ratio(on, off), "engram_layers": silenced,
            "by_group": {int(g): _ratio(on[probes.group_P == g], off[probes.group_P == g])
                         for g in np.unique(probes.group_P)}}


def _ratio(on: torch.Tensor, off: torch.Tensor) -> dict:
    acc_on = float(on.float().mean()) if len(on) else float("nan")
    acc_off = float(off.float().mean()) if len(off) else float("nan")
    # Identical hits retain everything (the control without memory), even where nothing was right.
    retention = acc_off / acc_on if acc_on > 0 else 1.0 if len(on) and torch.equal(on, off) else float("nan")
    return {"on": acc_on, "off": acc_off, "retention": retention, "n": len(on)}


def fmt_ratio(x: float | None) -> str:
    return "n/a" if x is None or x != x else f"{x:.2f}"
