"""`engram probe collisions`: how crowded the hashed tables are on a real corpus.

Each distinct n-gram hashes to one row per head; two distinct n-grams on one row share an embedding and
only the other heads (and the gate) can tell them apart. Counting that on the train split, per order and
head, and against the balls-in-bins expectation of a uniform hash, says whether the table is big enough
for the corpus and whether the hash spreads n-grams as evenly as a random function would.
"""

# Shapes: N tokens, H hash heads (order-major, then head), U distinct n-grams.

from __future__ import annotations

import numpy as np
import torch

from engram.probes.common import ngram_windows, unique_ngrams

FRACTIONS = (0.125, 0.25, 0.5, 1.0)


def expected_used(m: int, n: int) -> float:
    """Expected occupied rows after ``n`` distinct keys land uniformly on ``m`` rows: m(1 - (1 - 1/m)^n)."""
    return m * -np.expm1(n * np.log1p(-1.0 / m))


def expected_collision_rate(m: int, n: int) -> float:
    """Expected share of ``n`` uniformly hashed keys that share their row with another: 1 - (1 - 1/m)^(n-1)."""
    return float(-np.expm1((n - 1) * np.log1p(-1.0 / m))) if n > 0 else 0.0


def row_stats(rows_U: np.ndarray, m: int) -> dict:
    """Statistics of one head given the row of each distinct n-gram."""
    U = len(rows_U)
    _, inverse, per_row = np.unique(rows_U, return_inverse=True, return_counts=True)
    shared = int((per_row[inverse.ravel()] > 1).sum()) if U else 0
    used = len(per_row)
    return {"table_rows": m, "distinct_ngrams": U, "rows_used": used,
            "collision_rate": shared / U if U else 0.0, "ngrams_per_used_row": U / used if used else 0.0,
            "expected_rows_used": expected_used(m, U), "expected_collision_rate": expected_collision_rate(m, U)}


def head_stats(hasher, comp_N: np.ndarray, layer: int) -> list[dict]:
    """Per n-gram order and head of ``layer``: the :func:`row_stats` of the distinct n-grams of the compressed
    id stream ``comp_N`` (n-grams that would reach before its start, padded by the hasher, are left out)."""
    rows_NH = hasher.hash_layer(torch.from_numpy(np.asarray(comp_N, dtype=np.int64))[None], layer)[0].numpy()
    K, out = hasher.n_head, []
    for n in range(2, hasher.max_ngram_size + 1):
        first, _, _ = unique_ngrams(ngram_windows(comp_N, n))
        end_U = first + n - 1  # the position whose row ids cover the n-gram ending there
        for k in range(K):
            col = (n - 2) * K + k
            m = hasher.table_sizes[layer][n - 2][k]
            out.append({"layer": layer, "order": n, "head": k, **row_stats(rows_NH[end_U, col], m)})
    return out


def growth(hasher, comp_N: np.ndarray, layer: int, fractions=FRACTIONS) -> list[dict]:
    """:func:`head_stats` on prefixes of the stream (``fractions`` of it), each row tagged with its tokens."""
    out = []
    for f in fractions:
        n_tok = max(1, int(round(len(comp_N) * f)))
        out += [{"fraction": f, "tokens": n_tok, **r} for r in head_stats(hasher, comp_N[:n_tok], layer)]
    return out


def growth_plot(path, rows: list[dict]):
    """Rows used per order (mean over heads) vs corpus tokens, the uniform expectation dashed, the table size
    dotted."""
    from engram.probes.common import figure

    layer = min(r["layer"] for r in rows)
    rows = [r for r in rows if r["layer"] == layer]

    def plot(fig, ax):
        for i, n in enumerate(sorted({r["order"] for r in rows})):
            color = f"C{i}"
            pts = sorted({r["tokens"] for r in rows if r["order"] == n})
            sel = [[r for r in rows if r["order"] == n and r["tokens"] == t] for t in pts]
            ax.plot(pts, [np.mean([r["rows_used"] for r in s]) for s in sel], marker="o", color=color,
                    label=f"{n}-grams: rows used")
            ax.plot(pts, [np.mean([r["expected_rows_used"] for r in s]) for s in sel], ls="--", color=color,
                    label=f"{n}-grams: uniform hashing")
            ax.plot(pts, [np.mean([r["distinct_ngrams"] for r in s]) for s in sel], ls=":", marker=".",
                    color=color, alpha=0.6, label=f"{n}-grams: distinct")
            ax.axhline(np.mean([r["table_rows"] for r in sel[-1]]), color=color, lw=0.8, alpha=0.4)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("train tokens hashed")
        ax.set_ylabel("count (mean over heads); thin line: table rows")
        ax.set_title(f"Engram layer {layer}: table occupancy as the corpus grows")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)

    return figure(path, plot)
