"""Rank 0's record of a run: metrics.jsonl, TensorBoard events, evaluation JSON files and the console."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..core import dist
from ..core.base import ConfigError, write_json, write_text


def metrics_up_to(path: Path, step: int, log) -> list[str]:
    """The lines of metrics.jsonl for steps up to `step`.

    A last line that is cut short (the run was killed, or the disk filled, while writing it) is
    dropped with a warning; an unreadable line anywhere else is an error naming it.
    """
    if not path.exists():
        return []
    lines = path.read_bytes().splitlines()
    kept = []
    for number, raw in enumerate(lines, start=1):
        try:
            row = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            if number < len(lines):
                raise ConfigError(f"{path}: line {number} is not a JSON metrics record; repair or remove that line") from None
            log.warning(f"{path}: dropped its incomplete last line (cut short when the run was interrupted)")
            break
        if row["step"] <= step:
            kept.append(raw.decode("utf-8") + "\n")
    return kept


class RunLog:
    """Rank 0's record of the run: metrics.jsonl, TensorBoard events, eval JSON files and the console."""

    def __init__(self, run_dir: Path, total_steps: int, start_step: int, tensorboard: bool, kind):
        from tqdm import tqdm

        self.run_dir, self.log, self.kind = run_dir, dist.get_logger(), kind
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
        # A resumed run drops what the interrupted one logged after its checkpoint: the file then
        # reads as one uninterrupted run. On rank 0 alone, but a failure reaches every rank.
        dist.main_first(lambda: write_text(path, "".join(metrics_up_to(path, start_step, self.log))))
        dist.main_first(lambda: (run_dir / "eval").mkdir(exist_ok=True))
        self.tensorboard = None
        if tensorboard and dist.is_main():
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops the events of an interrupted run after its checkpoint, as above.
            self.tensorboard = SummaryWriter(
                str(run_dir / "tensorboard"), purge_step=start_step + 1 if start_step else None, flush_secs=10
            )

    def record(self, row: dict) -> None:
        def append():  # opened per row: a write that fails leaves no buffered row behind
            with open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8") as metrics:
                metrics.write(json.dumps(row, ensure_ascii=False) + "\n")

        dist.main_first(append)  # a full disk on rank 0 stops every rank with one line
        if self.tensorboard:
            for key, value in row.items():
                if key not in ("step", "epoch", "split"):
                    self.tensorboard.add_scalar(f"{row.get('split', 'train')}/{key}", value, row["step"])

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
        shown = ("loss", *self.kind.metric_names, "padding_efficiency")
        self.record({"step": step, "split": split, **{k: metrics[k] for k in shown}})
        dist.main_first(lambda: write_json(self.run_dir / "eval" / f"{split}-step-{step}.json", metrics))
        if dist.is_main():
            self.bar.write(
                f"eval {split} @ step {step}: loss {metrics['loss']:.4f}  {self.kind.report(metrics)}  "
                f"(padding efficiency {metrics['padding_efficiency']:.2f})"
            )

    def close(self) -> None:
        self.bar.close()
        if self.tensorboard:
            self.tensorboard.close()
