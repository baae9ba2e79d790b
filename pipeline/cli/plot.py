"""`python -m pipeline plot RUN_DIR`: one PNG of a run's loss, learning rate, gradient norm and
dev metrics over optimizer steps, read from RUN_DIR/metrics.jsonl (works on a running job),
and one of a dev evaluation's confusion matrix: the exported weights' once the run has finished
(eval_results.json), else the latest evaluation's (eval/dev-step-N.json)."""

from __future__ import annotations

from pathlib import Path

from .. import tasks
from ..core import dist
from ..core.base import ConfigError, load_json
from ..train import runlog
from ..train.figures import NO_FONT, confusion_figure, label_font, pyplot

SMOOTHING = 0.9  # weight of the loss curve's moving average


def read_metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """(training rows, evaluation rows) of metrics.jsonl: evaluation rows name their split."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise ConfigError(f"{run_dir}: no metrics.jsonl (not a run directory, or the run has not logged a step yet)")
    rows = [row for _, row in runlog.read_metrics(path, dist.get_logger())]  # a running job's last line may be cut
    return [r for r in rows if "split" not in r], [r for r in rows if "split" in r]


def describe_run(run_dir: Path) -> str:
    """'run NAME, model M, data TRAIN' for titles, from the run's train_config.json (names, not paths)."""
    config = run_dir / "train_config.json"
    if not config.is_file():
        return f"run {run_dir.name}"
    cfg = load_json(config)
    return f"run {run_dir.name}, model {Path(cfg['model']).name}, data {Path(cfg['train_file']).name}"


def baseline(run_dir: Path) -> dict | None:
    """The run's baseline (RUN_DIR/eval/baseline.json: name, dev and test metrics), if it has one."""
    path = run_dir / "eval" / "baseline.json"
    return load_json(path) if path.is_file() else None


def smoothed(values: list[float], weight: float = SMOOTHING) -> list[float]:
    """TensorBoard's smoothing: an exponential moving average, debiased so it starts at the first values."""
    out, average = [], 0.0
    for i, value in enumerate(values, start=1):
        average = weight * average + (1 - weight) * value
        out.append(average / (1 - weight**i))
    return out


def plot_run(run_dir: Path, output: Path) -> Path:
    """Loss (raw faint, smoothed, and the evaluations' loss), learning rate, gradient norm (and the
    fp16 loss scale), and the dev metrics with the baseline's as dashed lines."""
    plt = pyplot()
    train, evals = read_metrics(run_dir)
    if not train:
        raise ConfigError(f"{run_dir}/metrics.jsonl: no training steps logged yet")
    steps = [r["step"] for r in train]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharex=True)

    ax = axes[0, 0]
    losses = [r["loss"] for r in train]
    ax.plot(steps, losses, lw=0.8, alpha=0.3, color="C0", label="train (per step)")
    ax.plot(steps, smoothed(losses), lw=2, color="C0", label=f"train (smoothed, EMA {SMOOTHING})")
    for i, split in enumerate(sorted({r["split"] for r in evals if "loss" in r}), start=1):
        rows = [r for r in evals if r["split"] == split and "loss" in r]
        ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], marker="o", color=f"C{i}", label=f"{split} loss")
    ax.set_title("loss")
    ax.legend(fontsize=8)

    ax = axes[0, 1]
    ax.plot(steps, [r["lr"] for r in train], lw=1.5)
    ax.set_title("learning rate")

    ax = axes[1, 0]
    norms = [(r["step"], r["grad_norm"]) for r in train if "grad_norm" in r]
    if norms:
        ax.plot(*zip(*norms), lw=1, color="C0")
    ax.set_title("gradient norm" + (" and fp16 loss scale" if any("loss_scale" in r for r in train) else ""))
    scales = [(r["step"], r["loss_scale"]) for r in train if "loss_scale" in r]
    if scales:
        twin = ax.twinx()
        twin.step(*zip(*scales), where="post", color="C3", lw=1)
        twin.set_yscale("log", base=2)
        twin.set_ylabel("loss scale", color="C3")

    ax = axes[1, 1]
    dev = [r for r in evals if r["split"] == "dev"]
    reference = baseline(run_dir)
    names = [name for name in tasks.all_metric_names() if dev and name in dev[0]]  # the run's task's metrics
    for i, metric in enumerate(names):
        ax.plot([r["step"] for r in dev], [r[metric] for r in dev], marker="o", color=f"C{i}", label=f"dev {metric}")
        if reference and metric in reference.get("dev", {}):
            ax.axhline(reference["dev"][metric], ls="--", lw=1, color=f"C{i}", label=f"{reference['name']} {metric}")
    ax.set_title("dev metrics" + (f" (dashed: the {reference['name']} baseline)" if reference else ""))
    if names:
        ax.legend(fontsize=8)
    for ax in axes[1]:
        ax.set_xlabel("optimizer step")
    fig.suptitle(describe_run(run_dir))
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


def plot_confusion(title: str, matrix: dict, output: Path) -> Path:
    """The confusion matrix (train.figures.confusion_figure) as a PNG; where no installed font draws
    the label names, the key is printed as well as drawn in the picture."""
    if not label_font(matrix["labels"]):
        print(f"plot: no installed font draws these label names ({NO_FONT} gives one); the confusion matrix numbers them:")
        print("\n".join(f"  {i}: {name}" for i, name in enumerate(matrix["labels"])))
    fig = confusion_figure(title, matrix)
    fig.savefig(output, dpi=100)
    pyplot().close(fig)
    return output


def add_parser(sub) -> None:
    p = sub.add_parser(
        "plot",
        help="PNGs of a run's loss, learning rate, gradient norm and dev metrics over steps, and of its dev confusion matrix",
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
        title, matrix = confusion
        path = output.with_name(output.stem + "-confusion.png")
        heading = f"confusion matrix, {title}\n{describe_run(run_dir)}"
        print(f"plot: {plot_confusion(heading, matrix, path)}")
    return 0
