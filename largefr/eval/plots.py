"""ROC curves as PNG files (matplotlib's Agg canvas directly: no pyplot, no global backend change)."""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np


def plot_roc(
    curves: Mapping[str, tuple[np.ndarray, np.ndarray]],
    path: str | os.PathLike[str],
    title: str = "ROC",
    min_far: float = 1e-6,
) -> Path:
    """Write TAR against FAR (log axis from the smallest FAR a curve reaches, >= ``min_far``) to ``path``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not curves:
        raise ValueError("expected at least one ROC curve to plot")
    fig = Figure(figsize=(6, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    left = 1.0
    for name, (fpr, tpr) in curves.items():
        fpr, tpr = np.asarray(fpr), np.asarray(tpr)
        if fpr.shape != tpr.shape or fpr.ndim != 1:
            raise ValueError(f"curve {name!r}: expected 1-D fpr and tpr of equal length, got {fpr.shape}, {tpr.shape}")
        keep = fpr > 0  # a log axis cannot show FAR = 0
        ax.plot(fpr[keep], tpr[keep], lw=1.5, label=name)
        left = min(left, float(fpr[keep].min()) if keep.any() else left)
    ax.set_xscale("log")
    ax.set_xlim(max(min_far, left / 2), 1.0)
    ax.set_ylim(0.0, 1.01)
    ax.set_xlabel("False accept rate")
    ax.set_ylabel("True accept rate")
    ax.set_title(title)
    ax.grid(True, which="both", ls=":", lw=0.5)
    ax.legend(loc="lower right")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out
