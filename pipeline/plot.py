"""`python -m pipeline plot RUN_DIR`: one PNG of a run's loss, learning rate, throughput and
evaluation metrics over optimizer steps, read from RUN_DIR/metrics.jsonl (works on a running job)."""

from __future__ import annotations

import json
from pathlib import Path

from .base import ConfigError
from .task import ALL_METRIC_NAMES


def read_metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """(training rows, evaluation rows) of metrics.jsonl."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise ConfigError(f"{run_dir}: no metrics.jsonl (not a run directory, or the run has not logged a step yet)")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [r for r in rows if "loss" in r], [r for r in rows if "split" in r]


def plot_run(run_dir: Path, output: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on cluster nodes
    import matplotlib.pyplot as plt

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
        for metric in [name for name in ALL_METRIC_NAMES if name in rows[0]]:  # the run's task's metrics
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


def add_parser(sub) -> None:
    p = sub.add_parser("plot", help="PNG of a run's loss, learning rate, throughput and eval metrics over steps")
    p.add_argument("run_dir", help="run directory (holds metrics.jsonl)")
    p.add_argument("--output", help="PNG to write (default: RUN_DIR/metrics.png)")


def main(args) -> int:
    run_dir = Path(args.run_dir)
    print(f"plot: {plot_run(run_dir, Path(args.output) if args.output else run_dir / 'metrics.png')}")
    return 0
