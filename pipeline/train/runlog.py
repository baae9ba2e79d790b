"""Rank 0's record of a run: metrics.jsonl, evaluation JSON files, the console, and the trackers
(--report-to: TensorBoard, MLflow, W&B; train/tracking.py) that get every row."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from ..core import dist
from ..core.base import ConfigError, load_json, write_json, write_text
from . import figures

ROW_KEYS = ("step", "epoch", "split")  # what a metrics.jsonl row says about itself, not a measurement


def metrics_up_to(path: Path, step: int, log) -> list[str]:
    """The lines of metrics.jsonl for steps up to `step` (see split_metrics)."""
    return split_metrics(path, step, log)[0]


def split_metrics(path: Path, step: int, log) -> tuple[list[str], list[str]]:
    """The lines of metrics.jsonl for steps up to `step`, and those after it (see read_metrics)."""
    kept, later = [], []
    for line, row in read_metrics(path, log):
        (kept if row["step"] <= step else later).append(line + "\n")
    return kept, later


def read_metrics(path: Path, log) -> list[tuple[str, dict]]:
    """(line, row) of each record of metrics.jsonl; none if there is no such file.

    A last line that is cut short (the run was killed, or the disk filled, while writing it) is
    dropped with a warning; an unreadable line anywhere else is an error naming it.
    """
    if not path.exists():
        return []
    lines = path.read_bytes().splitlines()
    records = []
    for number, raw in enumerate(lines, start=1):
        try:
            line = raw.decode("utf-8")
            records.append((line, json.loads(line)))
        except (UnicodeDecodeError, json.JSONDecodeError):
            if number < len(lines):
                raise ConfigError(f"{path}: line {number} is not a JSON metrics record; repair or remove that line") from None
            log.warning(f"{path}: dropped its incomplete last line (cut short when the run was interrupted)")
    return records


def continue_metrics(path: Path, step: int, log) -> None:
    """Make metrics.jsonl read as one uninterrupted run up to `step`, where this run continues.

    The rows after it (what an interrupted run logged after its checkpoint, or the branch a run resumed
    from an older checkpoint abandons) are kept beside it, in metrics.superseded-after-step-N-TIME.jsonl,
    as the checkpoints after it are (checkpoint.supersede_later): nothing logged is lost."""
    kept, later = split_metrics(path, step, log)
    if later:
        aside = path.with_name(f"metrics.superseded-after-step-{step}-{time.strftime('%Y%m%d-%H%M%S')}.jsonl")
        write_text(aside, "".join(later))
        log.info(f"metrics.jsonl: {len(later)} rows after step {step} (which this run logs again) moved to {aside.name}")
    write_text(path, "".join(kept))


class RunLog:
    """Rank 0's record of the run: metrics.jsonl, eval JSON files, the console and the trackers."""

    def __init__(self, run_dir: Path, total_steps: int, start_step: int, kind, trackers=None):
        """`trackers`: rank 0's train.tracking.Trackers (--report-to), None elsewhere."""
        from tqdm import tqdm

        self.run_dir, self.log, self.kind, self.trackers = run_dir, dist.get_logger(), kind, trackers
        self.bar = tqdm(
            total=total_steps,
            initial=start_step,
            desc="train",
            unit="step",
            disable=not dist.is_main(),
            dynamic_ncols=True,
            mininterval=0.5 if sys.stderr.isatty() else 60,
        )  # a log file gets few bar lines
        path = run_dir / "metrics.jsonl"
        # A resumed run sets aside what was logged after its checkpoint. On rank 0 alone, but a failure reaches every rank.
        dist.main_first(lambda: continue_metrics(path, start_step, self.log))
        dist.main_first(lambda: (run_dir / "eval").mkdir(exist_ok=True))

    def record(self, row: dict) -> None:
        def append():  # opened per row: a write that fails leaves no buffered row behind
            with open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8") as metrics:
                metrics.write(json.dumps(row, ensure_ascii=False) + "\n")

        dist.main_first(append)  # a full disk on rank 0 stops every rank with one line
        if self.trackers:  # every number of the row, as SPLIT/KEY (train/loss, dev/macro_f1, dev/loss)
            split = row.get("split", "train")
            values = {f"{split}/{k}": v for k, v in row.items() if k not in ROW_KEYS and isinstance(v, (int, float))}
            self.trackers.metrics(values, row["step"])

    def step(self, row: dict, show: bool) -> None:
        self.record(row)
        self.bar.update(1)
        if show and dist.is_main():
            self.bar.write(
                f"step {row['step']:>5}  loss {row['loss']:.4f}  lr {row['lr']:.3g}  "
                f"{row['samples_per_s']:.1f} samples/s  {row['tokens_per_s']:.0f} tokens/s  "
                f"padding efficiency {row['padding_efficiency']:.2f}"
            )

    def epoch(self, epoch: int, real: float, padded: float) -> None:
        """The epoch's padding efficiency (its steps' real tokens over the tokens computed, all ranks)."""
        if dist.is_main():
            self.bar.write(
                f"epoch {epoch}: padding efficiency {real / max(padded, 1):.3f} ({real:.0f} real of {padded:.0f} tokens computed)"
            )

    def eval(self, step: int, split: str, metrics: dict) -> None:
        # A classifier's evaluation also has its loss and padding efficiency; pretraining's loss is its metric.
        shown = [key for key in ("loss", *self.kind.metric_names, "padding_efficiency") if key in metrics]
        self.record({"step": step, "split": split, **{k: metrics[k] for k in shown}})
        dist.main_first(lambda: write_json(self.run_dir / "eval" / f"{split}-step-{step}.json", metrics))
        if dist.is_main():
            loss = f"loss {metrics['loss']:.4f}  " if "loss" in metrics else ""
            padding = f"  (padding efficiency {metrics['padding_efficiency']:.2f})" if "padding_efficiency" in metrics else ""
            self.bar.write(f"eval {split} @ step {step}: {loss}{self.kind.report(metrics)}{padding}")
        if self.trackers:
            self.track_details(step, split, metrics)

    def track_details(self, step: int, split: str, metrics: dict) -> None:
        """What metrics.jsonl leaves to the evaluation files: per-class recall and F1, the confusion matrix as an image."""
        per_class = {
            f"{split}/{measure}/{name}": row[measure]
            for name, row in metrics.get("per_class", {}).items()
            for measure in ("recall", "f1")
            if measure in row
        }
        self.trackers.metrics(per_class, step)
        if metrics.get("confusion_matrix"):
            title = f"confusion matrix, {split} step {step}\nrun {self.run_dir.name}"
            self.trackers.image(
                f"{split}/confusion_matrix", figures.rgb(figures.confusion_figure(title, metrics["confusion_matrix"])), step
            )

    def close(self, step: int | None = None, files: list[Path] = (), tags: dict | None = None) -> None:
        """End the record; at the end of training (`step`), the baseline's metrics (RUN_DIR/eval/baseline.json,
        where a baseline was run), `files` and `tags` go to the trackers before they close."""
        self.bar.close()
        if not self.trackers:
            return
        baseline = self.run_dir / "eval" / "baseline.json"
        if step is not None and baseline.is_file():
            scores = load_json(baseline)
            values = {
                f"baseline/{split}/{metric}": value
                for split in ("dev", "test")
                for metric, value in scores.get(split, {}).items()
                if isinstance(value, (int, float))
            }
            self.trackers.metrics(values, step)
        self.trackers.files(list(files), tags or {})
        self.trackers.close()
