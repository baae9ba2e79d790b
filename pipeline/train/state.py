"""Where training stands: the counters the loop advances, saved in every checkpoint and restored on resume."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..checkpoint.checkpoints import STATE, read_json


@dataclass
class TrainerState:
    """Where training stands; saved in every checkpoint and restored on resume."""

    epoch: int = 0
    step_in_epoch: int = 0  # optimizer steps already taken in `epoch` (its data order is seeded)
    optimizer_step: int = 0  # accumulation windows done, as DeepSpeed's engine.global_steps counts them
    skipped_steps: int = 0  # of those, windows whose update fp16's loss scaler skipped (engine.skipped_steps)
    best_metric: float | None = None  # the best dev value of --best-metric at a checkpointed step
    best_step: int | None = None
    evaluations_since_best: int = 0  # checkpointed evaluations after best_step: early stopping's count
    dev_evaluation_due: bool = False  # a stop saved this step before its periodic dev evaluation: the resumed run does it
    world_size: int = 1
    train_batch_size: int = 0
    label_names: list[str] = field(default_factory=list)
    class_weights: dict = field(default_factory=dict)  # {label: weight} of the loss (--class-weights); empty: unweighted
    thresholds: dict | None = None  # multi-label: {label: decision threshold} of the latest dev evaluation, exported
    train_data: dict = field(default_factory=dict)  # data.train_fingerprint: resume only on the same batches
    train_config: dict = field(default_factory=dict)
    ds_config: dict = field(default_factory=dict)
    tracker_runs: dict = field(default_factory=dict)  # {tracker: its run's id} (--report-to): a resumed run continues them

    @property
    def applied_steps(self) -> int:
        """Updates the weights received: the LR scheduler's position (DeepSpeed does not step it on a skip)."""
        return self.optimizer_step - self.skipped_steps

    def note_evaluation(self, value: float, step: int, higher_is_better: bool = True) -> None:
        """A dev value of the best metric at a checkpointed step: a new best, or one more without improvement."""
        better = self.best_metric is None or (value > self.best_metric if higher_is_better else value < self.best_metric)
        if better:
            self.best_metric, self.best_step, self.evaluations_since_best = value, step, 0
        else:
            self.evaluations_since_best += 1

    def continue_from(self, saved: TrainerState) -> None:
        """Take over a checkpoint's position and counters (resume); the rest describes this run."""
        self.epoch, self.step_in_epoch, self.optimizer_step = saved.epoch, saved.step_in_epoch, saved.optimizer_step
        self.skipped_steps = saved.skipped_steps
        self.best_metric, self.best_step = saved.best_metric, saved.best_step
        self.evaluations_since_best = saved.evaluations_since_best
        self.dev_evaluation_due = saved.dev_evaluation_due
        self.thresholds = saved.thresholds  # multi-label: until the next dev evaluation tunes new ones
        self.tracker_runs = dict(saved.tracker_runs)

    def advance(self, steps_per_epoch: int, skipped: bool = False) -> None:
        """One accumulation window done: the data moves on even when fp16 skipped its update."""
        self.optimizer_step += 1
        self.skipped_steps += skipped
        self.step_in_epoch += 1
        if self.step_in_epoch == steps_per_epoch:
            self.epoch, self.step_in_epoch = self.epoch + 1, 0


def read_state(ckpt: Path) -> TrainerState:
    return TrainerState(**read_json(ckpt / STATE))
