"""Figures for fine-tuning runs: the training loss curve and the method comparison."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Sequence


def _figure(figsize: tuple[float, float]):
    import matplotlib.pyplot as plt  # picks a non-interactive backend by itself on a machine without a display
    return plt, *plt.subplots(figsize=figsize)


def _save(fig: Any, path: str | Path) -> Path:
    """Save a PNG atomically (temporary file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.tmp-", suffix=".png")
    os.close(fd)
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(tmp, 0o666 & ~mask)  # mkstemp makes private files; give the usual permissions
    os.replace(tmp, path)
    return path


def loss_curve(history: Sequence[dict], path: str | Path | None = None, title: str = "training loss") -> Any:
    """Training loss against step (from the Trainer's log history). Saves a PNG when `path` is given."""
    plt, fig, ax = _figure((5, 3))
    steps = [h["step"] for h in history]
    ax.plot(steps, [h["loss"] for h in history], marker=".")
    ax.set(xlabel="step", ylabel="loss (response tokens)", title=title)
    ax.grid(alpha=0.3)
    if path is None:
        return fig
    out = _save(fig, path)
    plt.close(fig)
    return out


def comparison(rows: Sequence[dict], path: str | Path | None = None) -> Any:
    """Held-out loss and score per method, mean ± std over seeds (rows as `compare.summarize` returns them)."""
    plt, fig, axes = _figure((9, 3.2))
    fig.delaxes(axes)
    axes = fig.subplots(1, 2)
    names = [r["method"] for r in rows]
    for ax, key, label in ((axes[0], "loss", "held-out loss (lower is better)"),
                           (axes[1], "score", "instruction score (higher is better)")):
        means = [r.get(f"{key}_mean") for r in rows]
        stds = [r.get(f"{key}_std") or 0.0 for r in rows]
        ys = [i for i, m in enumerate(means) if m is not None]
        ax.errorbar([means[i] for i in ys], ys, xerr=[stds[i] for i in ys], fmt="o", capsize=4, color="tab:blue")
        ax.set_yticks(range(len(rows)), names if ax is axes[0] else [""] * len(rows))
        ax.set_ylim(len(rows) - 0.5, -0.5)
        ax.set_xlabel(label)
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle("Same data and budget; dots: mean over seeds, whiskers: ± std (note the zoomed axes)")
    if path is None:
        return fig
    out = _save(fig, path)
    plt.close(fig)
    return out
