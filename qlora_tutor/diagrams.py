"""Diagrams drawn by code for notebooks 02-04: the LoRA branch, the block/absmax/double-quantization hierarchy,
and one QLoRA training step.

Each function returns a new `matplotlib.figure.Figure` built without pyplot: nothing global changes (no rcParams,
no registered figure), and the same call draws the same picture. In a notebook the returned figure displays
itself; elsewhere call `fig.savefig(path)`.
"""

from __future__ import annotations

from typing import Any

FROZEN, TRAINABLE, TEMPORARY, NOTE = "#c8c8c8", "#8ec5ff", "#ffe08a", "#555555"


def _canvas(width: float, height: float, xlim: tuple[float, float], ylim: tuple[float, float]) -> tuple[Any, Any]:
    from matplotlib.figure import Figure  # imported here: importing the package needs no matplotlib
    fig = Figure(figsize=(width, height), dpi=100)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set(xlim=xlim, ylim=ylim)
    ax.set_axis_off()
    return fig, ax


def _box(ax: Any, x: float, y: float, w: float, h: float, text: str, color: str, size: float = 9,
         dashed: bool = False) -> tuple[float, float, float, float]:
    from matplotlib.patches import FancyBboxPatch
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.02,rounding_size=0.08", facecolor=color,
                                edgecolor="#333333", linewidth=1.0, linestyle="--" if dashed else "-"))
    ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=size)
    return x, y, w, h


def _arrow(ax: Any, start: tuple[float, float], end: tuple[float, float], text: str = "", dashed: bool = False,
           color: str = "#333333", text_offset: tuple[float, float] = (0.0, 0.12)) -> None:
    ax.annotate("", xy=end, xytext=start, arrowprops=dict(arrowstyle="-|>", color=color, lw=1.3,
                                                          linestyle="--" if dashed else "-", shrinkA=2, shrinkB=2))
    if text:
        ax.text((start[0] + end[0]) / 2 + text_offset[0], (start[1] + end[1]) / 2 + text_offset[1], text,
                ha="center", va="bottom", fontsize=8, color=color)


def lora_branch() -> Any:
    """The LoRA layer: the frozen weight W on one path, the trainable A (r×in) then B (out×r) on the other,
    scaled by s = alpha/r and added: y = W·x + b + s·B·A·x. B starts at zero, so at step 0 y = W·x + b."""
    fig, ax = _canvas(8.0, 3.6, (0, 10), (0, 4.6))
    ax.text(5, 4.35, "LoRA: y = W·x + b + s·B·(A·x),   s = alpha / r", ha="center", fontsize=11, weight="bold")
    _box(ax, 0.2, 0.9, 0.7, 2.6, "x\n(in)", "white", 10)
    _box(ax, 2.2, 2.35, 3.0, 1.6, "W   (out × in)\nfrozen: no gradient\n(stored in 4 bits in QLoRA)", FROZEN)
    _box(ax, 2.2, 0.55, 1.6, 0.9, "A   (r × in)\nrandom at start", TRAINABLE)
    _box(ax, 4.5, 0.25, 1.0, 1.5, "B\n(out × r)\nzero at\nstart", TRAINABLE, 8.5)
    _box(ax, 8.7, 0.9, 0.8, 2.6, "y\n(out)", "white", 10)
    from matplotlib.patches import Circle
    ax.add_patch(Circle((7.4, 2.2), 0.28, facecolor="white", edgecolor="#333333"))
    ax.text(7.4, 2.2, "+", ha="center", va="center", fontsize=14)
    _arrow(ax, (0.9, 2.9), (2.2, 3.15))
    _arrow(ax, (0.9, 1.4), (2.2, 1.0))
    _arrow(ax, (3.8, 1.0), (4.5, 1.0), "A·x: r numbers", text_offset=(0.0, 0.55))
    _arrow(ax, (5.2, 3.15), (7.2, 2.4), "W·x + b")
    _arrow(ax, (5.5, 1.0), (7.2, 2.0), "× s", text_offset=(0.25, -0.35))
    _arrow(ax, (7.68, 2.2), (8.7, 2.2))
    ax.text(5, 0.02, "trainable: r·(in + out) numbers instead of in·out;  at step 0 B = 0, so the layer is exactly "
                     "the pretrained one", ha="center", fontsize=8, color=NOTE)
    return fig


def quantization_hierarchy(blocksize: int = 64, nested_blocksize: int = 256) -> Any:
    """What NF4 with double quantization stores, level by level, with the bits each level costs per weight:
    4-bit codes; one absmax per block (c2: 32 bits, or 8 bits with DQ); one fp32 c1 per `nested_blocksize`
    constants; one fp32 offset per tensor."""
    c2_plain, c2_dq = 32 / blocksize, 8 / blocksize
    c1 = 32 / (blocksize * nested_blocksize)
    fig, ax = _canvas(9.0, 4.2, (0, 12), (0, 5.6))
    ax.text(6, 5.3, f"NF4 + double quantization: what is stored (blocks of {blocksize}, constants in blocks of "
                    f"{nested_blocksize})", ha="center", fontsize=11, weight="bold")
    n_show = 6  # blocks drawn; the rest are suggested by "…"
    for i in range(n_show):
        x = 0.3 + i * 1.1
        _box(ax, x, 3.7, 1.0, 0.9, f"{blocksize} codes\n4 bits each", TRAINABLE if i == 0 else "#cfe6ff", 7.5)
        _box(ax, x + 0.2, 2.35, 0.6, 0.6, "c₂", TEMPORARY, 8)
        _arrow(ax, (x + 0.5, 3.7), (x + 0.5, 2.95))
    ax.text(0.3 + n_show * 1.1 + 0.15, 4.1, "…", fontsize=14)
    ax.text(0.3 + n_show * 1.1 + 0.15, 2.55, "…", fontsize=14)
    _box(ax, 2.2, 0.75, 2.4, 0.75, f"c₁ (fp32): one per {nested_blocksize} c₂", "#ffc9a8", 8)
    for i in range(n_show):
        _arrow(ax, (0.8 + i * 1.1, 2.35), (3.4, 1.5), color="#999999")
    _box(ax, 5.0, 0.75, 1.9, 0.75, "offset (fp32):\nmean of all c₂", "#ffc9a8", 8)
    rows = [(4.15, "codes", "4 bits / weight"),
            (2.65, "c₂ = block absmax", f"32/{blocksize} = {c2_plain:.3f} bit (fp32)\n→ 8/{blocksize} = {c2_dq:.3f} "
                                        "bit (8-bit, DQ)"),
            (1.12, "c₁ and offset", f"32/({blocksize}·{nested_blocksize}) = {c1:.4f} bit\n+ 32 bits per tensor")]
    for y, name, cost in rows:
        ax.text(8.0, y + 0.12, name, fontsize=9, weight="bold", va="bottom")
        ax.text(8.0, y + 0.08, cost, fontsize=8.5, va="top")
    ax.text(6, 0.15, f"total per weight: 4 + {c2_plain:.3f} = {4 + c2_plain:.3f} bits without DQ;  "
                     f"4 + {c2_dq:.3f} + {c1:.4f} = {4 + c2_dq + c1:.3f} bits with DQ", ha="center", fontsize=9,
            color=NOTE)
    return fig


def qlora_step() -> Any:
    """One training step of a QLoRA layer: forward dequantizes the 4-bit weight for one matmul and drops it;
    backward dequantizes it again for ∂L/∂x; only the adapter gets weight gradients."""
    fig, ax = _canvas(9.5, 4.4, (0, 12), (0, 5.8))
    ax.text(6, 5.5, "One QLoRA training step (one layer)", ha="center", fontsize=11, weight="bold")
    _box(ax, 0.2, 2.35, 1.9, 1.1, "W in 4 bits\nNF4 codes + constants\n(kept, frozen)", FROZEN, 8)
    ax.text(0.2, 4.9, "forward  →", fontsize=9, weight="bold")
    _box(ax, 2.8, 4.0, 1.6, 0.8, "dequantize\nto bf16", "white", 8.5)
    _box(ax, 5.0, 4.0, 1.6, 0.8, "W (bf16)\ntemporary", TEMPORARY, 8.5, dashed=True)
    _box(ax, 7.2, 4.0, 1.9, 0.8, "y = x·Wᵀ + b\n+ s·B·A·x", "white", 8.5)
    _box(ax, 9.8, 4.0, 1.8, 0.8, "… loss", "white", 8.5)
    _arrow(ax, (2.1, 3.2), (2.8, 4.3))
    _arrow(ax, (4.4, 4.4), (5.0, 4.4))
    _arrow(ax, (6.6, 4.4), (7.2, 4.4))
    _arrow(ax, (9.1, 4.4), (9.8, 4.4))
    ax.text(5.8, 3.65, "freed after the matmul: not saved for backward", ha="center", fontsize=7.5, color=NOTE)
    ax.text(0.2, 1.6, "backward  ←", fontsize=9, weight="bold")
    _box(ax, 2.8, 0.7, 1.6, 0.8, "dequantize\nagain", "white", 8.5)
    _box(ax, 5.0, 0.7, 1.6, 0.8, "W (bf16)\ntemporary", TEMPORARY, 8.5, dashed=True)
    _box(ax, 7.2, 0.7, 1.9, 0.8, "∂L/∂x = ∂L/∂y · W\n(to earlier layers)", "white", 8)
    _box(ax, 9.8, 0.7, 1.8, 0.8, "∂L/∂y", "white", 8.5)
    _arrow(ax, (2.1, 2.6), (2.8, 1.1), dashed=True)
    _arrow(ax, (4.4, 1.1), (5.0, 1.1), dashed=True)
    _arrow(ax, (6.6, 1.1), (7.2, 1.1), dashed=True)
    _arrow(ax, (9.8, 1.1), (9.1, 1.1), dashed=True)
    _arrow(ax, (11.3, 4.0), (11.3, 1.5), dashed=True)
    _box(ax, 7.2, 2.35, 3.5, 0.9, "∂L/∂A, ∂L/∂B: the only weight\ngradients (adapters, fp32);\nnone for W (frozen)",
         TRAINABLE, 8)
    _arrow(ax, (10.2, 1.5), (10.2, 2.35), dashed=True)
    ax.text(6, 0.12, "the price: one extra dequantization per layer per step; the gain: no dense copy of W is kept "
                     "from forward to backward", ha="center", fontsize=8, color=NOTE)
    return fig
