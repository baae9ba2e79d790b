"""Confusion-matrix pictures: Chinese label names drawn with whatever installed font has them, and
where none has, the names given in a legend inside the picture."""

from __future__ import annotations

import pytest
from helpers import in_ci

from pipeline.train.figures import confusion_figure, font_for, label_font, pyplot, rgb

LABELS = ["肺炎", "心力衰竭", "支气管哮喘"]
MATRIX = {"labels": LABELS, "counts": [[3, 1, 0], [0, 2, 1], [1, 0, 4]]}


def glyph(char: str, font) -> object:
    """`char` drawn alone in `font`, as pixels."""
    fig = pyplot().figure(figsize=(0.5, 0.5), dpi=50)
    fig.text(0.1, 0.1, char, fontproperties=font, fontsize=20)
    return rgb(fig)


def test_chinese_label_names_are_drawn_with_an_installed_cjk_font():
    font = label_font(LABELS)
    if font is None:
        message = "no installed font has these Chinese characters: apt-get install fonts-noto-cjk (CI installs it)"
        pytest.fail(message) if in_ci() else pytest.skip(message)
    fig = confusion_figure("confusion matrix", MATRIX)
    ticks = fig.axes[0].get_yticklabels()
    assert [t.get_text() for t in ticks] == LABELS
    assert {t.get_fontproperties().get_file() for t in ticks} == {font.get_file()}
    pyplot().close(fig)
    # Real glyphs, not one missing-glyph box for every character: two characters draw differently.
    first, second = glyph("肺", font), glyph("炎", font)
    assert first.std() > 0 and (first != second).any()


def test_label_names_no_installed_font_has_are_numbered_with_a_legend_inside_the_picture(tmp_path):
    labels = ["\u0378甲", "b\u0379"]  # unassigned code points: no font has a glyph for them
    assert font_for(frozenset("".join(labels))) is None
    fig = confusion_figure("confusion matrix", {"labels": labels, "counts": [[1, 0], [0, 1]]})
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["0", "1"]
    (legend,) = [t.get_text() for t in fig.texts]
    assert "0: \\u0378\\u7532" in legend and "1: b\\u0379" in legend and "fonts-noto-cjk" in legend
    fig.savefig(tmp_path / "c.png")
    pyplot().close(fig)
