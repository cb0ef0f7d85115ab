"""The diagrams draw without error or missing glyphs, return a figure, repeat exactly, and touch no global state."""

import io
import warnings

import matplotlib
import pytest

from qlora_tutor import diagrams

DIAGRAMS = [diagrams.lora_branch, diagrams.quantization_hierarchy, diagrams.qlora_step,
            lambda: diagrams.quantization_hierarchy(blocksize=128, nested_blocksize=64)]


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


@pytest.mark.parametrize("draw", DIAGRAMS, ids=["lora_branch", "hierarchy", "qlora_step", "hierarchy_128_64"])
def test_draws_a_figure_deterministically_without_global_state(draw):
    import matplotlib.pyplot as plt
    from matplotlib.figure import Figure

    rc = dict(matplotlib.rcParams)
    figures = plt.get_fignums()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "Glyph ... missing from font": a box would show instead of a symbol
        fig = draw()
        first = _png(fig)
    assert isinstance(fig, Figure) and len(first) > 10_000
    assert first == _png(draw())
    assert plt.get_fignums() == figures, "a diagram registered a pyplot figure (it would stay open)"
    assert dict(matplotlib.rcParams) == rc


def test_the_hierarchy_labels_its_bits_from_the_block_sizes():
    texts = lambda fig: " ".join(t.get_text() for t in fig.axes[0].texts)
    assert "4.127 bits with DQ" in texts(diagrams.quantization_hierarchy())
    assert "4.500 bits without DQ" in texts(diagrams.quantization_hierarchy())
    assert f"{4 + 8 / 128 + 32 / (128 * 64):.3f} bits with DQ" in texts(diagrams.quantization_hierarchy(128, 64))
