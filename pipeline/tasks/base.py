"""What a task is: the `Task` every task module fills in, its `Metric`s, the registry, and the
helpers tasks share (label sets, {label: number} files, class weights).

A task decides, in one place: how a label is read, the label set and encoding, the model's
`problem_type` (and so its loss), class weights, logits -> probabilities and predictions, decision
thresholds, and the metrics. Data, the model builder, evaluation, predict, the run log, plot and
the config check all ask the task. Each task is one module of this package that calls `register`;
the package imports every module, so a new task is one new file.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass

from ..core.base import ConfigError, load_json


@dataclass(frozen=True)
class Metric:
    """One summary metric of an evaluation: logged every evaluation, plotted, and selectable as
    --best-metric, which compares values in the metric's direction."""

    name: str
    label: str  # how the console shows it
    compute: Callable  # (labels, predictions, present class ids) -> float
    higher_is_better: bool = True


def f1_over_present(average: str) -> Callable:
    def compute(labels, predictions, present) -> float:
        from sklearn.metrics import f1_score

        # Averaged over the classes present in the reference: a class absent from the eval set has
        # no F1 to measure, and counting it as 0 would punish perfect predictions.
        return float(f1_score(labels, predictions, labels=present, average=average, zero_division=0))

    return compute


def parse_label(value, separator: str = "") -> str:
    """One record's label as read from its file: a string or a number (read as a string).

    Raises ValueError saying what is wrong; the reader adds the file, record and column."""
    if isinstance(value, list):
        raise ValueError(
            f"is a list of labels ({json.dumps(value, ensure_ascii=False)[:80]}); several labels per record need --task multi_label"
        )
    if isinstance(value, bool) or not isinstance(value, (str, int, float)) or not str(value).strip():
        raise ValueError(f"is empty or not a string or number ({value!r})")
    return str(value)


def label_names(train: dict, train_path, others: dict) -> list[str]:
    """The sorted label set of the training data (for multi-label: every label of any record's set);
    a label only seen in another split is an error.

    `train` maps each training label to {"count", "first_record"} (data.py counts them while
    tokenizing); `others` maps each other split's path to the same for its labels."""
    names = sorted(train)
    if len(names) < 2:
        raise ConfigError(f"{train_path}: found {len(names)} distinct label(s); a classifier needs at least 2")
    for path, labels in others.items():
        unknown = sorted((seen["first_record"], label) for label, seen in labels.items() if label not in train)
        if unknown:
            row, label = unknown[0]
            raise ConfigError(f"{path}: record {row}: label '{label}' never appears in the training file {train_path}")
    return names


def summary(values: dict, table: tuple[Metric, ...]) -> str:
    """The console's one line of an evaluation: 'accuracy 0.7860  macro-F1 0.7211  ...'."""
    return "  ".join(f"{m.label} {values[m.name]:.4f}" for m in table)


# ----------------------------------------------------------------------------------------------
# {label: number} files: class weights and thresholds
# ----------------------------------------------------------------------------------------------

THRESHOLD_EXPECTED, WEIGHT_EXPECTED = "a number between 0 and 1", "a positive number"


def read_label_values(path: str, what: str, valid: Callable[[float], bool], expected: str) -> dict[str, float]:
    """A JSON file {label: number}, every number checked (before any process group: config.py)."""
    values = load_json(path)
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not valid(value):
            raise ConfigError(f"{what} {path}: label '{name}' has {value!r}, expected {expected}")
    return values


def label_values(path: str, names: list[str], what: str, valid: Callable[[float], bool], expected: str) -> list[float]:
    """The numbers of a JSON file {label: number} that names exactly the task's labels, in `names` order."""
    values = read_label_values(path, what, valid, expected)
    unknown = sorted(set(values) - set(names))
    missing = [name for name in names if name not in values]
    if unknown or missing:
        problems = ([f"unknown labels {unknown}"] if unknown else []) + ([f"missing labels {missing}"] if missing else [])
        raise ConfigError(f"{what} {path}: {'; '.join(problems)}; it must give one value for each of the labels {names}")
    return [float(values[name]) for name in names]


def valid_weight(value: float) -> bool:
    return value > 0 and math.isfinite(value)


def valid_threshold(value: float) -> bool:
    return 0.0 < value < 1.0


# ----------------------------------------------------------------------------------------------
# The task and its registry
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Task:
    """One task's answers to what the pipeline asks; fields are plain functions."""

    name: str
    problem_type: str  # transformers' problem_type: the model's own loss, saved with the export
    metric_table: tuple[Metric, ...]
    output_key: str  # the key of a predicted label (set) in prediction files and `predict` output
    parse: Callable  # (file value, separator) -> label; ValueError says what is wrong
    label_names: Callable  # (training label counts, train path, {other path: counts}) -> the label set
    encode: Callable  # (Arrow array of the cache's labels, names) -> class ids, or multi-hot rows
    probabilities: Callable  # logits -> probabilities
    balanced_weights: Callable  # (training label counts, records, names) -> a weight per label
    weighted_loss: Callable  # weights tensor -> (logits, labels) -> the micro-batch's mean loss
    thresholds: Callable  # (labels, probabilities, names, --threshold) -> {label: threshold} or None
    predict: Callable  # (probabilities, thresholds) -> predictions
    metrics: Callable  # (labels, predictions, names, thresholds) -> the evaluation's dict
    describe: Callable  # (one prediction, names) -> what `predict` prints for it
    check_options: Callable  # (TrainConfig, need) -> None: refuses options this task does not take

    @property
    def metric_names(self) -> tuple[str, ...]:
        return tuple(m.name for m in self.metric_table)

    def metric(self, name: str) -> Metric:
        return next(m for m in self.metric_table if m.name == name)

    def summary(self, values: dict) -> str:
        return summary(values, self.metric_table)

    def class_weights(self, setting: str, counts: dict, num_records: int, names: list[str]) -> list[float] | None:
        """--class-weights: none -> None; balanced -> from the training labels' counts; a .json file -> {label: weight}."""
        if setting == "none":
            return None
        if setting == "balanced":
            return self.balanced_weights(counts, num_records, names)
        return label_values(setting, names, "--class-weights", valid_weight, WEIGHT_EXPECTED)


REGISTRY: dict[str, Task] = {}


def register(task: Task) -> Task:
    """Make `task` selectable as --task NAME (and findable from an export's problem_type)."""
    if task.name in REGISTRY:
        raise ValueError(f"task {task.name} registered twice")
    REGISTRY[task.name] = task
    return task


def option_error(key: str, value, expected: str) -> ConfigError:
    return ConfigError(f"training config: '{key}' = {value!r}, expected {expected}")
