"""`engram probe logit-lens` and `engram probe cka`: where in depth a model's prediction takes shape.

The logit lens reads each layer's residual stream through the final norm and LM head; the KL from the
final distribution to that reading says how far from done the prediction is at that depth. The paper
argues that Engram, by handing the early layers their static patterns, makes a model "deeper": its lens
KL should fall earlier than a baseline's. Linear CKA compares the layers of two models directly: a
diagonal shifted towards earlier layers of the Engram model says the same.
"""

# Shapes: B batch, T time, D model width, V vocabulary, S stream points (embedding + one per block), R rows.

from __future__ import annotations

import torch
import torch.nn.functional as F

from engram.probes.common import residual_streams


@torch.no_grad()
def streams(model, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Residual streams ``S x [R, D]`` over all tokens of ``batches`` (index 0: the embedding, s: after block
    s) and the final logits ``[R, V]``."""
    per_batch, logits = [], []
    for x, _ in batches:
        with residual_streams(model) as found:
            logits.append(model(x).logits.flatten(0, 1).float())
        per_batch.append([h.flatten(0, 1) for h in found])
    S = len(per_batch[0])
    return [torch.cat([b[s] for b in per_batch]) for s in range(S)], torch.cat(logits)


@torch.no_grad()
def lens_kl(model, batches) -> list[float]:
    """Mean over tokens of ``KL(final || lens(stream s))`` per stream point; the last is 0 by construction."""
    hs, final = streams(model, batches)
    logp_final = F.log_softmax(final.double(), dim=-1)
    out = []
    for h in hs:
        logp = F.log_softmax(model.lm_head(model.norm(h)).double(), dim=-1)
        kl = F.kl_div(logp, logp_final, log_target=True, reduction="none").sum(-1)
        out.append(float(kl.mean()))
    return out


def linear_cka(x_RD: torch.Tensor, y_RE: torch.Tensor) -> float:
    """Linear CKA (Kornblith et al. 2019) of two representations of the same rows: invariant to rotations
    and isotropic scaling of either, so layers of different models (and widths) can be compared."""
    x = x_RD.double() - x_RD.double().mean(0)
    y = y_RE.double() - y_RE.double().mean(0)
    cross = torch.linalg.matrix_norm(y.T @ x) ** 2
    den = torch.linalg.matrix_norm(x.T @ x) * torch.linalg.matrix_norm(y.T @ y)
    return float(cross / den) if den > 0 else float("nan")


def cka_matrix(hs_a: list[torch.Tensor], hs_b: list[torch.Tensor]) -> list[list[float]]:
    """``[S_a][S_b]`` linear CKA between every pair of stream points of two models (same tokens)."""
    return [[linear_cka(a, b) for b in hs_b] for a in hs_a]


def stream_names(model) -> list[str]:
    """Names of the stream points: the embedding, then each block (with its Engram layers marked)."""
    return ["emb"] + [f"L{blk.layer}" + ("+E" if blk.engram is not None else "") for blk in model.blocks]


def lens_plot(path, curves: dict[str, tuple[list[str], list[float]]]):
    from engram.probes.common import figure

    def plot(fig, ax):
        for label, (_, kl) in curves.items():
            ax.plot(range(len(kl)), kl, marker="o", label=label)
        longest = max(curves.values(), key=lambda c: len(c[0]))[0]
        ax.set_xticks(range(len(longest)), longest)
        ax.set_xlabel("residual stream after (emb: token embedding; +E: block with Engram)")
        ax.set_ylabel("KL(final || logit lens), nats")
        ax.set_yscale("symlog", linthresh=1e-3)
        ax.set_title("Logit lens")
        ax.grid(alpha=0.3)
        ax.legend()

    return figure(path, plot)


def cka_plot(path, cka: list[list[float]], names_a: list[str], names_b: list[str], label_a: str, label_b: str):
    from engram.probes.common import figure

    def plot(fig, ax):
        im = ax.imshow(torch.tensor(cka).numpy(), origin="lower", cmap="magma", vmin=0.0, vmax=1.0)
        ax.set_yticks(range(len(names_a)), names_a)
        ax.set_xticks(range(len(names_b)), names_b)
        ax.set_ylabel(label_a)
        ax.set_xlabel(label_b)
        for i, row in enumerate(cka):
            for j, v in enumerate(row):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="w" if v < 0.6 else "k")
        ax.set_title("Linear CKA between layers")
        fig.colorbar(im, ax=ax, label="CKA")

    n = max(len(names_a), len(names_b))
    return figure(path, plot, size=(2.5 + 0.6 * n, 1.8 + 0.5 * n))
