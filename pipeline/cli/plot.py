"""`python -m pipeline plot RUN_DIR`: one PNG of a run's loss, learning rate, throughput and
evaluation metrics over optimizer steps, read from RUN_DIR/metrics.jsonl (works on a running job),
and one of a dev evaluation's confusion matrix: the exported weights' once the run has finished
(eval_results.json), else the latest evaluation's (eval/dev-step-N.json)."""

from __future__ import annotations

import json
from pathlib import Path

from .. import tasks
from ..core.base import ConfigError, load_json


def read_metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """(training rows, evaluation rows) of metrics.jsonl."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise ConfigError(f"{run_dir}: no metrics.jsonl (not a run directory, or the run has not logged a step yet)")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [r for r in rows if "split" not in r], [r for r in rows if "split" in r]


def pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on cluster nodes
    import matplotlib.pyplot as plt

    return plt


def plot_run(run_dir: Path, output: Path) -> Path:
    plt = pyplot()
    train, evals = read_metrics(run_dir)
    if not train:
        raise ConfigError(f"{run_dir}/metrics.jsonl: no training steps logged yet")
    steps = [r["step"] for r in train]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharex=True)
    panels = [
        (axes[0, 0], "loss", "loss (mean over the window and ranks)"),
        (axes[0, 1], "lr", "learning rate"),
        (axes[1, 0], "samples_per_s", "throughput (samples/s)"),
    ]
    for ax, key, title in panels:
        ax.plot(steps, [r[key] for r in train], lw=1)
        ax.set_title(title)
    ax = axes[1, 1]
    for split in sorted({r["split"] for r in evals}):
        rows = [r for r in evals if r["split"] == split]
        for metric in [name for name in tasks.all_metric_names() if name in rows[0]]:  # the run's task's metrics
            ax.plot([r["step"] for r in rows], [r[metric] for r in rows], marker="o", label=f"{split} {metric}")
    ax.set_title("evaluation")
    if evals:
        ax.legend(fontsize=8)
    for ax in axes[1]:
        ax.set_xlabel("optimizer step")
    fig.suptitle(str(run_dir))
    fig.tight_layout()
    fig.savefig(output, dpi=100)
    plt.close(fig)
    return output


def dev_confusion(run_dir: Path) -> tuple[str, dict] | None:
    """(title, confusion matrix) of the run's final dev evaluation, else of its latest; None before
    any, or for a run evaluated before evaluations held one."""
    if (run_dir / "eval_results.json").is_file():
        results = load_json(run_dir / "eval_results.json")
        title, matrix = f"dev, step {results['step']} (exported)", results["dev"].get("confusion_matrix")
    else:
        evals = sorted(run_dir.glob("eval/dev-step-*.json"), key=lambda p: int(p.stem.rsplit("-", 1)[1]))
        if not evals:
            return None
        title, matrix = f"dev, step {evals[-1].stem.rsplit('-', 1)[1]} (latest)", load_json(evals[-1]).get("confusion_matrix")
    return (title, matrix) if matrix else None


def drawable(labels: list[str]) -> bool:
    """Whether matplotlib's default font has a glyph for every character of the labels (Chinese label
    names need a CJK font, which many servers lack: they would be drawn as empty boxes)."""
    from matplotlib.font_manager import FontProperties, findfont
    from matplotlib.ft2font import FT2Font

    font = FT2Font(findfont(FontProperties()))
    return all(font.get_char_index(ord(c)) for c in "".join(labels) if not c.isspace())


def plot_confusion(title: str, matrix: dict, output: Path) -> Path:
    """Counts per (true, predicted) label, each cell shaded by its share of the true label's records;
    for a multi-label run, per label its outcome counts (`columns`: tp, fn, fp, tn) shaded by their
    share of the records."""
    import numpy as np

    plt = pyplot()

    counts, labels = np.array(matrix["counts"]), matrix["labels"]
    if not drawable(labels):
        print("plot: no installed font draws these label names; the confusion matrix numbers them:")
        print("\n".join(f"  {i}: {name}" for i, name in enumerate(labels)))
        labels = [str(i) for i in range(len(labels))]
    columns = matrix.get("columns", labels)
    share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    size = 2 + 0.6 * len(labels)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for (i, j), n in np.ndenumerate(counts):
        ax.text(j, i, str(n), ha="center", va="center", fontsize=8, color="white" if share[i, j] > 0.5 else "black")
    ax.set_xticks(range(len(columns)), columns, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("outcome" if "columns" in matrix else "predicted")
    ax.set_ylabel("label" if "columns" in matrix else "true")
    ax.set_title(f"confusion matrix: {title}")
    fig.colorbar(image, ax=ax, label="share of the true label's records")
    fig.tight_layout()
    fig.savefig(output, dpi=100)
    plt.close(fig)
    return output


def add_parser(sub) -> None:
    p = sub.add_parser(
        "plot",
        help="PNGs of a run's loss, learning rate, throughput and eval metrics over steps, and of its dev confusion matrix",
    )
    p.add_argument("run_dir", help="run directory (holds metrics.jsonl)")
    p.add_argument(
        "--output", help="PNG to write (default: RUN_DIR/metrics.png); the confusion matrix goes beside it, as NAME-confusion.png"
    )


def main(args) -> int:
    run_dir = Path(args.run_dir)
    output = Path(args.output) if args.output else run_dir / "metrics.png"
    print(f"plot: {plot_run(run_dir, output)}")
    confusion = dev_confusion(run_dir)
    if confusion:
        print(f"plot: {plot_confusion(*confusion, output.with_name(output.stem + '-confusion.png'))}")
    return 0
