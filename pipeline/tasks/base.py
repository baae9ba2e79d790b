"""What a task is: the `Task` every task module fills in, its `Metric`s, the registry, and the
helpers tasks share (label sets, {label: number} files, class weights).

A task decides, in one place: how a label is read, the label space (a set of labels, or one
number) and encoding, the model class and its `problem_type` (and so its loss), class weights,
logits -> scores and predictions, decision thresholds, the metrics and their direction, the
console report, the export's extra files and what `predict` prints. Data, the model builder,
evaluation, export, predict, the run log, plot and the config check all ask the task. Each task is one module of this package that calls `register`;
the package imports every module, so a new task is one new file.
"""

from __future__ import annotations

import json
import math
import re
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


# A whole number written as a decimal: "1.0" (pandas writes an integer column with a missing value
# as floats), "2." — read as the integer, so 1, "1", 1.0 and "1.0" are one class.
WHOLE_DECIMAL = re.compile(r"(-?\d+)\.0*")


def parse_label(value, separator: str = "") -> str:
    """One record's label as read from its file: a string or a number, as a string.

    One label is one class however a file spells it: surrounding whitespace is dropped (" 1", a
    trailing space from Excel) and a whole number written as a decimal is the integer (1.0, "1.0"
    -> "1"). Other spellings stay as written: "01", "1e0" and "0.5" are labels of their own.
    Raises ValueError saying what is wrong; the reader adds the file, record and column."""
    if isinstance(value, list):
        raise ValueError(
            f"is a list of labels ({json.dumps(value, ensure_ascii=False)[:80]}); several labels per record need --task multi_label"
        )
    if isinstance(value, bool) or not isinstance(value, (str, int, float)) or not str(value).strip():
        raise ValueError(f"is empty or not a string or number ({value!r})")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"is not a finite number ({value!r})")
    text = str(value).strip()
    whole = WHOLE_DECIMAL.fullmatch(text)
    return whole.group(1) if whole else text


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


# Defaults of a task with a label set (a classifier); a task without one (a number per record) sets
# its own in their place.


def sequence_classifier():
    """transformers' auto class for a text classifier (or regressor): a head of num_labels outputs."""
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification


def class_config(names: list[str]) -> dict:
    """The model config's label space: one output per label, named."""
    return {"num_labels": len(names), "id2label": dict(enumerate(names)), "label2id": {name: i for i, name in enumerate(names)}}


def config_label_names(config: dict) -> list[str]:
    """The label names of a saved model config (config.json: id2label's keys are strings there)."""
    id2label = config.get("id2label") or {}
    return [id2label[key] for key in sorted(id2label, key=int)]


def recall_per_class(metrics: dict) -> str:
    return "\n  recall per class: " + "  ".join(f"{name} {row['recall']:.2f}" for name, row in metrics["per_class"].items())


def label_map(names: list[str], thresholds) -> dict:
    """An export's label_map.json {label: output index}."""
    return {"label_map.json": {name: i for i, name in enumerate(names)}}


@dataclass(frozen=True)
class Task:
    """One task's answers to what the pipeline asks; fields are plain functions. The fields with
    defaults are those of a classifier."""

    name: str
    problem_type: str  # transformers' problem_type: the model's own loss, saved with the export
    metric_table: tuple[Metric, ...]
    output_key: str  # the key of a prediction in prediction files and `predict` output
    parse: Callable  # (file value, separator) -> label; ValueError says what is wrong
    label_names: Callable  # (training label counts, train path, {other path: counts}) -> the label set
    encode: Callable  # (Arrow array of the cache's labels, names) -> what the model's loss takes
    scores: Callable  # pooled logits -> what predictions are decided from (class probabilities)
    predict: Callable  # (scores, thresholds) -> predictions
    metrics: Callable  # (labels, predictions, names, thresholds) -> the evaluation's dict
    describe: Callable  # (one prediction, names) -> how prediction files and `predict` write it
    check_options: Callable  # (TrainConfig) -> None: refuses options this task does not take
    model_class: Callable = sequence_classifier  # () -> the transformers auto class that builds and loads the model
    model_config: Callable = class_config  # label names -> the model config's label space (num_labels, ...)
    config_label_names: Callable = config_label_names  # saved config.json -> label names (predict, export)
    classes_of: Callable = lambda label: [label]  # a parsed label -> the label names it counts toward (data)
    balanced_weights: Callable | None = None  # (training label counts, records, names) -> a weight per label
    weighted_loss: Callable | None = None  # weights on the logits' device -> (logits, labels) -> the micro-batch's mean loss
    thresholds: Callable = lambda labels, scores, names, setting: None  # -> {label: threshold} or None
    initial_bias: Callable | None = None  # (training targets, class weights or None) -> the output layer's starting bias
    details: Callable = recall_per_class  # metrics -> what the console shows after the summary line
    export_files: Callable = label_map  # (names, thresholds) -> {file name: JSON} written beside the export's weights
    export_thresholds: Callable = lambda export_dir, names, override: None  # what `predict` decides with
    scores_in_output: bool = True  # `predict` prints each label's probability
    # Pretraining (masked_lm): reads unlabelled --text-file records (word starts cached), masks each
    # batch with `masking(cfg, tokenizer)` (a data.masking.Masking), is scored by its loss on a
    # held-out part (`metrics(loss sum, tokens, names, thresholds)`) and stores `probe_view` of the
    # probe's logits for the export to reproduce.
    pretraining: bool = False
    masking: Callable | None = None
    probe_view: Callable = lambda logits: logits

    @property
    def metric_names(self) -> tuple[str, ...]:
        return tuple(m.name for m in self.metric_table)

    def metric(self, name: str) -> Metric:
        return next(m for m in self.metric_table if m.name == name)

    def summary(self, values: dict) -> str:
        return summary(values, self.metric_table)

    def report(self, values: dict) -> str:
        """The console's text of an evaluation: the summary line and the task's details."""
        return self.summary(values) + self.details(values)

    def output(self, prediction, scores, names: list[str]) -> dict:
        """What `predict` prints for one text; prediction None: an empty text, whose row stays."""
        row = {self.output_key: None if prediction is None else self.describe(prediction, names)}
        if self.scores_in_output:
            row["probabilities"] = None if scores is None else {n: round(float(v), 6) for n, v in zip(names, scores)}
        return row

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
