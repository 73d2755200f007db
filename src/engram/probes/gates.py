"""`engram gates`: how much each token lets the memory in, per Engram layer and residual branch.

The gate is the sigmoid that scales the looked-up value before it joins the residual stream, so a gate
near 1 on a token means the model trusts the n-gram memory there. The gates are read by re-running each
Engram module on the very inputs the model gave it (a forward hook), so what is shown is what the model
computed, without any change to the model.
"""

# Shapes: B batch, T time, M residual branches, L Engram layers.

from __future__ import annotations

import html
import json
from contextlib import contextmanager
from pathlib import Path

import torch

from engram.probes.common import engram_modules


@contextmanager
def capture_gates(model):
    """Within the block, every forward pass records ``{layer: gates [B, T, M]}`` in the yielded dict."""
    found: dict[int, torch.Tensor] = {}

    def hook_for(layer: int):
        def hook(module, args, kwargs, output):
            # module.forward (not module(...)) so the hooks do not run again on the re-run
            _, aux = module.forward(*args, **{**kwargs, "return_gates": True})
            found[layer] = aux["gates"].detach()

        return hook

    handles = [mod.register_forward_hook(hook_for(layer), with_kwargs=True) for layer, mod in engram_modules(model)]
    try:
        yield found
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def token_gates(model, ids: list[int]) -> tuple[torch.Tensor, list[str]]:
    """Gates ``[T, L*M]`` for one token sequence (columns: layer-major, then branch) and the column names."""
    if not engram_modules(model):
        raise ValueError("this model has no Engram layers, so no gates")
    with capture_gates(model) as found:
        model(torch.tensor([ids]))
    cols, names = [], []
    for layer in sorted(found):
        g_TM = found[layer][0].float()
        for m in range(g_TM.shape[1]):
            cols.append(g_TM[:, m])
            names.append(f"layer {layer}" + (f" / branch {m}" if g_TM.shape[1] > 1 else ""))
    return torch.stack(cols, dim=1), names


def token_strings(tok, ids: list[int]) -> list[str]:
    """Each token decoded on its own (byte pieces of a split character show as the replacement sign)."""
    return [tok.decode([i]) for i in ids]


def heatmap(path: Path, gates_TC: torch.Tensor, names: list[str], tokens: list[str]) -> Path:
    from engram.probes.common import figure

    T, C = gates_TC.shape

    def plot(fig, ax):
        im = ax.imshow(gates_TC.T.numpy(), aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0,
                       interpolation="nearest")
        ax.set_yticks(range(C), names)
        ax.set_xticks(range(T), [repr(s)[1:-1] for s in tokens], rotation=90, fontsize=7, family="monospace")
        ax.set_xlabel("token")
        ax.set_title("Engram gate per token")
        fig.colorbar(im, ax=ax, label="gate", fraction=0.03, pad=0.02)

    return figure(path, plot, size=(max(6.0, 0.18 * T + 2.5), 1.2 + 0.35 * C + 1.6))


_CSS = """
body { font-family: sans-serif; margin: 1.5em; max-width: 60em; }
.text { font-family: monospace; white-space: pre-wrap; line-height: 1.9; border: 1px solid #ccc; padding: .8em; }
.tok { border-radius: 2px; cursor: default; }
.legend { display: flex; align-items: center; gap: .5em; margin: .8em 0; }
.bar { width: 16em; height: 1em; border: 1px solid #999;
       background: linear-gradient(to right, rgba(230,80,0,0), rgba(230,80,0,1)); }
#tip { position: fixed; display: none; background: #222; color: #fff; padding: .4em .6em; font: 12px monospace;
       border-radius: 3px; pointer-events: none; white-space: pre; }
"""

_JS = """
const tip = document.getElementById('tip');
const names = JSON.parse(document.getElementById('names').textContent);
document.querySelectorAll('.tok').forEach(el => {
  el.addEventListener('mousemove', e => {
    const g = JSON.parse(el.dataset.gates);
    tip.textContent = names.map((n, i) => n + ': ' + g[i].toFixed(4)).join('\\n');
    tip.style.display = 'block'; tip.style.left = (e.clientX + 12) + 'px'; tip.style.top = (e.clientY + 12) + 'px';
  });
  el.addEventListener('mouseleave', () => { tip.style.display = 'none'; });
});
"""


def gates_html(gates_TC: torch.Tensor, names: list[str], tokens: list[str], title: str) -> str:
    """A self-contained page (inline CSS and JS, nothing fetched): the text with each token shaded by its
    gate averaged over layers and branches; hovering shows every layer/branch value (also in ``title``)."""
    spans = []
    for s, g in zip(tokens, gates_TC.tolist(), strict=True):
        mean = sum(g) / len(g)
        tip = "\n".join(f"{n}: {v:.4f}" for n, v in zip(names, g, strict=True))
        spans.append(f'<span class="tok" style="background: rgba(230,80,0,{mean:.4f})" '
                     f"data-gates='{json.dumps(g)}' data-mean='{json.dumps(mean)}' "
                     f'title="{html.escape(tip)}">{html.escape(s)}</span>')
    names_json = html.escape(json.dumps(names), quote=False)
    return "\n".join([
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">', f"<title>{html.escape(title)}</title>",
        f"<style>{_CSS}</style></head><body>", f"<h1>{html.escape(title)}</h1>",
        '<div class="legend"><span>gate 0</span><span class="bar"></span><span>1</span>'
        "<span>(shade: mean over layers and branches; hover a token for each value)</span></div>",
        f'<div class="text">{"".join(spans)}</div>', '<div id="tip"></div>',
        f'<script type="application/json" id="names">{names_json}</script>', f"<script>{_JS}</script>",
        "</body></html>", ""])
