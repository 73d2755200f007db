"""PNG figures for reports: drawn off-screen (no display needed) and written atomically, so a report
never links a half-written plot. matplotlib is imported on first use only, keeping `import engram` light."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from engram.atomic import atomic_path


def save_png(path: Path, plot: Callable, size: tuple[float, float] = (7, 4.5), *, grid: bool = False) -> Path:
    """Draw ``plot(fig, ax)`` on a new figure of ``size`` inches and write it to ``path`` as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=size)
    try:
        plot(fig, ax)
        if grid:
            ax.grid(alpha=0.3)
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=110, format="png")
    finally:
        plt.close(fig)
    return path
