"""Figures: the training loss curve, the method comparison, memory per method, and what one GPU holds under each
strategy."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from .paths import atomic_save_file


def _figure(figsize: tuple[float, float]):
    import matplotlib.pyplot as plt  # picks a non-interactive backend by itself on a machine without a display
    return plt.subplots(figsize=figsize)


def _save(fig: Any, path: str | Path) -> Path:
    """Save a PNG atomically and close the figure."""
    import matplotlib.pyplot as plt
    out = atomic_save_file(path, lambda tmp: fig.savefig(tmp, dpi=110, bbox_inches="tight"))
    plt.close(fig)
    return out


def loss_curve(history: Sequence[dict], path: str | Path | None = None, title: str = "training loss") -> Any:
    """Training loss against step (from the Trainer's log history). Saves a PNG when `path` is given."""
    fig, ax = _figure((5, 3))
    steps = [h["step"] for h in history]
    ax.plot(steps, [h["loss"] for h in history], marker=".")
    ax.set(xlabel="step", ylabel="loss (response tokens)", title=title)
    ax.grid(alpha=0.3)
    return fig if path is None else _save(fig, path)


def comparison(rows: Sequence[dict], path: str | Path | None = None) -> Any:
    """Held-out loss and score per method, mean ± std over seeds (rows as `compare.summarize` returns them)."""
    fig, axes = _figure((9, 3.2))
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
    return fig if path is None else _save(fig, path)


_COLORS = {"frozen_weights": "#4c72b0", "quantization_constants": "#8172b2", "adapter_weights": "#55a868",
           "gradients": "#8c8c8c", "optimizer_state": "#c44e52", "activations": "#dd8452", "overhead": "#cccccc",
           "communication_buffers": "#937860", "gathered_units": "#64b5cd"}


def memory_bars(estimates: Mapping[str, Any], capacity_bytes: float | None = None, ax: Any = None,
                parts: Sequence[str] | None = None) -> Any:
    """One stacked bar per method (a `memory.MemoryEstimate` each), all on one y scale in GB, so that the methods
    can be compared by eye; a black tick marks each predicted peak and its value is written above the bar.

    The peak can sit below the bar's top: activations and gradients do not peak at the same moment.
    """
    from .memory import GB
    if ax is None:
        _, ax = _figure((6.5, 3.4))
    from matplotlib.patches import Patch
    top = 0.0
    order = list(parts or dict.fromkeys(k for k in _COLORS for e in estimates.values() if e.components.get(k, 0) > 0))
    for x, (label, est) in enumerate(estimates.items()):
        bottom = 0.0
        for k in order:
            v = est.components.get(k, 0) / GB
            if v <= 0:
                continue
            ax.bar(x, v, bottom=bottom, color=_COLORS.get(k, "#999999"), width=0.6)
            bottom += v
        ax.plot([x - 0.3, x + 0.3], [est.total / GB] * 2, color="black", lw=1.5)
        top = max(top, bottom, est.total / GB)
        ax.annotate(f"{est.total / GB:.1f} GB", (x, max(bottom, est.total / GB)), ha="center", va="bottom",
                    fontsize=8, xytext=(0, 2), textcoords="offset points")
    if capacity_bytes:
        ax.axhline(capacity_bytes / GB, color="red", ls="--", lw=1, label=f"card ({capacity_bytes / GB:.1f} GB)")
    ax.set_xticks(range(len(estimates)), list(estimates))
    ax.set_ylim(0, 1.12 * max(top, capacity_bytes / GB if capacity_bytes else 0.0))  # room for the labels
    ax.set_ylabel("GB (1e9 bytes), one scale for all")
    handles = [Patch(color=_COLORS.get(k, "#999999"), label=k.replace("_", " ")) for k in reversed(order)]
    if capacity_bytes:
        handles.append(ax.get_legend_handles_labels()[0][-1])
    ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # stacked as drawn
    return ax


def plot_per_gpu(estimates: Sequence[Any], capacity_bytes: float | None = None, ax: Any = None) -> Any:
    """Stacked bars, one per `memory.PerGPUMemory`: what one GPU holds, component by component (GB), with the
    card's size."""
    from .memory import GB
    if ax is None:
        _, ax = _figure((7, 3.2))
    seen: set[str] = set()
    for x, est in enumerate(estimates):
        bottom = 0.0
        for k, v in est.components.items():
            if v <= 0:
                continue
            ax.bar(x, v / GB, bottom=bottom, color=_COLORS.get(k, "#999999"), width=0.6,
                   label=k.replace("_", " ") if k not in seen else None)
            seen.add(k)
            bottom += v / GB
        ax.plot([x - 0.3, x + 0.3], [est.on_card / GB] * 2, color="black", lw=1)  # predicted peak + context
    if capacity_bytes:
        ax.axhline(capacity_bytes / GB, color="red", ls="--", lw=1,
                   label=f"card ({capacity_bytes / GB:.1f} GB)")
    ax.set_xticks(range(len(estimates)), [f"{e.strategy}\n{e.n_gpus} GPU" + "s" * (e.n_gpus > 1) +
                                          (" + offload" if e.settings.get("cpu_offload") else "")
                                          for e in estimates])
    ax.set_ylabel("GB per GPU")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return ax
