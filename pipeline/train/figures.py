"""Pictures of a run, drawn with matplotlib: the confusion matrix with its label names, for `plot`'s
PNGs and the trackers' images (train/tracking.py).

Label names are often Chinese, and matplotlib's default font has no CJK glyphs (they would be empty
boxes). Any installed font with the glyphs is used: fontconfig's list first (matplotlib's own list
is a cache made once, so it misses fonts installed later, such as Debian's fonts-noto-cjk), then
matplotlib's. Where none has them, the axes number the labels and the legend inside the picture
gives each number's name as Unicode escapes.
"""

from __future__ import annotations

import functools
import shutil
import subprocess

NO_FONT = "apt-get install fonts-noto-cjk"  # a Debian package that draws Chinese, Japanese and Korean


def pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on cluster nodes
    import matplotlib.pyplot as plt

    return plt


def has_glyphs(path: str, chars: frozenset[str]) -> bool:
    from matplotlib.ft2font import FT2Font

    try:
        font = FT2Font(path)
    except (OSError, RuntimeError, ValueError):  # a font file FreeType cannot open
        return False
    if font.family_name.startswith("Last Resort"):
        return False  # matplotlib ships it: every code point mapped to a placeholder box, not a glyph
    return all(font.get_char_index(ord(c)) for c in chars)


def fontconfig_candidates(chars: frozenset[str]) -> list[str]:
    """Font files fontconfig says cover `chars` (its charset query); none without fc-list."""
    wide = sorted(f"{ord(c):x}" for c in chars if ord(c) > 0x7F)
    if not wide or not shutil.which("fc-list"):
        return []
    listed = subprocess.run(["fc-list", f":charset={' '.join(wide)}", "file"], capture_output=True, text=True, timeout=30)
    paths = {line.split(":")[0].strip() for line in listed.stdout.splitlines() if line.strip()}
    return sorted(paths, key=lambda path: ("Bold" in path, path))  # regular weights first, as tick labels are


@functools.lru_cache(maxsize=8)
def font_for(chars: frozenset[str]) -> str | None:
    """The path of an installed font with a glyph for each of `chars`: matplotlib's default font if
    it has them, else one fontconfig or matplotlib lists; None if no installed font has them all."""
    from matplotlib.font_manager import FontProperties, findfont, fontManager

    chars = frozenset(c for c in chars if not c.isspace())
    candidates = [findfont(FontProperties()), *fontconfig_candidates(chars), *(f.fname for f in fontManager.ttflist)]
    return next((path for path in dict.fromkeys(candidates) if has_glyphs(path, chars)), None)


def label_font(labels: list[str]):
    """(FontProperties that draws every label name, or None where no installed font can)."""
    from matplotlib.font_manager import FontProperties

    path = font_for(frozenset("".join(labels)))
    return FontProperties(fname=path) if path else None


def escaped(name: str) -> str:
    """A label name a font without its characters can draw: non-ASCII characters as \\uXXXX."""
    return name.encode("ascii", "backslashreplace").decode("ascii")


def confusion_figure(title: str, matrix: dict):
    """Counts per (true, predicted) label, each cell shaded by its share of the true label's records;
    for a multi-label run, per label its outcome counts (`columns`: tp, fn, fp, tn) shaded by their
    share of the records. Returns the matplotlib figure."""
    import numpy as np

    plt = pyplot()
    counts, labels = np.array(matrix["counts"]), list(matrix["labels"])
    font = label_font(labels)
    shown = labels if font else [str(i) for i in range(len(labels))]
    columns = matrix.get("columns", shown)
    share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    size = 2 + 0.6 * len(labels)
    key_height = 0 if font else 0.15 * (len(labels) + 1) + 0.3  # inches for the legend's lines at 8 pt
    fig, ax = plt.subplots(figsize=(size + 1, size + key_height))
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for (i, j), n in np.ndenumerate(counts):
        ax.text(j, i, str(n), ha="center", va="center", fontsize=8, color="white" if share[i, j] > 0.5 else "black")
    ax.set_xticks(range(len(columns)), columns, rotation=45, ha="right", fontproperties=None if "columns" in matrix else font)
    ax.set_yticks(range(len(shown)), shown, fontproperties=font)
    ax.set_xlabel("outcome" if "columns" in matrix else "predicted")
    ax.set_ylabel("label" if "columns" in matrix else "true")
    ax.set_title(title, fontsize=10)
    fig.colorbar(image, ax=ax, label="share of the true label's records")
    if not font:
        key = "\n".join(f"{i}: {escaped(name)}" for i, name in enumerate(labels))
        fig.text(0.01, 0.01, f"labels (no installed font draws their names; {NO_FONT}):\n{key}", fontsize=8, va="bottom")
        fig.tight_layout(rect=(0, key_height / fig.get_figheight(), 1, 1))
    else:
        fig.tight_layout()
    return fig


def rgb(fig):
    """The figure as an RGB array (height, width, 3) for the trackers' images; the figure is closed."""
    import numpy as np

    fig.canvas.draw()
    array = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    pyplot().close(fig)
    return array
