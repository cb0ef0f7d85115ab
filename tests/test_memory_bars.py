"""notebook 06's memory figure: one stacked bar per method, every bar on the same y scale, in GB."""

import matplotlib

matplotlib.use("Agg")

from qlora_tutor import memory as M  # noqa: E402
from qlora_tutor import plots  # noqa: E402


def test_bars_share_one_scale_and_stack_every_component():
    est = {m: M.estimate("llama-7b", m) for m in ("full", "lora", "qlora")}
    ax = plots.memory_bars(est, capacity_bytes=24 * M.GIB)
    tops = {}
    for bar in ax.patches:
        x = round(bar.get_x() + bar.get_width() / 2)
        tops[x] = max(tops.get(x, 0.0), bar.get_y() + bar.get_height())
    for x, e in enumerate(est.values()):  # each bar's top is the sum of its components, in GB, on the same axis
        assert abs(tops[x] - sum(e.components.values()) / M.GB) < 1e-6
    assert tops[0] > 10 * tops[2]  # full fine-tuning dwarfs QLoRA on the common scale
    assert [t.get_text() for t in ax.get_xticklabels()] == ["full", "lora", "qlora"]
    assert "card (25.8 GB)" in [t.get_text() for t in ax.get_legend().get_texts()]
