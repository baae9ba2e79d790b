"""The training options: `TrainConfig`, checked once, and the command-line options built from it.

Each setting has one owner. `TrainConfig` owns data, model, paths and the loop's cadence; the
DeepSpeed JSON (ds_config.py) owns batch size, accumulation, precision, optimizer, scheduler,
clipping and ZeRO, where `global_batch`, `micro_batch` and `precision` only fill what it leaves
"auto" (a contradiction is refused). Everything here runs before any process group exists, so a bad
option fails fast with a message that names it, and the rest of the package trusts what it gets.
The task's own options (best_metric, threshold, label_separator, class weight files) are checked by
the task, at the same edge (`tasks.resolve`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from .base import ConfigError, load_json, unknown_key_message

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # pipeline/
TINY_MODEL_DIR = PACKAGE_DIR / "models" / "tiny-bert"
SAMPLE_DATA_DIR = PACKAGE_DIR / "sample_data"


# ----------------------------------------------------------------------------------------------
# The training config
# ----------------------------------------------------------------------------------------------

PRECISIONS = ("auto", "fp16", "bf16", "fp32")
# The allowed values of options whose meaning lives higher up (data/reading.py, data/tokenizer.py);
# the task and its options are checked by the task itself (tasks.resolve), at the same edge.
TRUNCATIONS = ("head", "tail", "head+tail")
LONG_RECORDS = ("truncate", "chunks")
POOLS = ("mean", "max")
VOCABULARIES = ("char", "wordpiece")
# The default: higher mean dev and test macro-F1 on the bundled sample (docs/data-and-models.md, 3 seeds).
DEFAULT_VOCABULARY = "wordpiece"
LR_SCALING = ("none", "linear", "sqrt")


@dataclass
class TrainConfig:
    """What to train on, which model, where results go, and how often to log/eval/save.

    Batch sizes, accumulation, optimizer, scheduler and precision live in the DeepSpeed JSON.
    """

    ds_config: str = field(default="ds_configs/small_zero2.json", metadata={"help": "DeepSpeed JSON config"})
    train_file: str = field(
        default=str(SAMPLE_DATA_DIR / "train.jsonl"), metadata={"help": "training data (.jsonl, .json, .csv, .tsv or .parquet)"}
    )
    dev_file: str = field(
        default=str(SAMPLE_DATA_DIR / "dev.jsonl"), metadata={"help": "dev data, evaluated during and after training"}
    )
    test_file: str = field(default="", metadata={"help": "optional test data, evaluated once after training"})
    text_column: str = field(default="text", metadata={"help": "name of the text column"})
    label_column: str = field(
        default="label",
        metadata={
            "help": "name of the label column (read as the task says: e.g. a string label; with --task multi_label a JSON list of labels)"
        },
    )
    task: str = field(
        default="single_label",
        metadata={
            "help": "the task, one module of pipeline/tasks/ each, e.g. "
            "single_label (one label per record: softmax, cross-entropy) or multi_label (a set of labels per "
            "record, e.g. several diagnoses: sigmoid, binary cross-entropy, a decision threshold per label)"
        },
    )
    label_separator: str = field(
        default="",
        metadata={
            "help": "multi_label: cut label strings at this separator, e.g. ';' for a CSV cell 'a;b' (default: labels are JSON lists)"
        },
    )
    threshold: str = field(
        default="",
        metadata={
            "help": "multi_label decision thresholds: per-label (the default: each label's threshold maximises its F1 on dev), "
            "global (one threshold maximising micro-F1 on dev), a number in (0, 1), or a .json file {label: threshold}; "
            "saved with the export (thresholds.json) and used by predict"
        },
    )
    class_weights: str = field(
        default="none",
        metadata={
            "help": "none, balanced (single_label: n / (k * count) per class; multi_label: pos_weight = negatives / positives "
            "per label) or a .json file {label: weight}; recorded in the checkpoint and train_config.json"
        },
    )
    model: str = field(
        default=str(TINY_MODEL_DIR),
        metadata={
            "help": "model directory: with weights it is fine-tuned, with config.json alone it is randomly initialised; without tokenizer files a vocabulary is built from the training texts (see vocabulary)"
        },
    )
    vocabulary: str = field(
        default=DEFAULT_VOCABULARY,
        metadata={
            "help": "wordpiece|char: the vocabulary built from the training texts when the model directory has no tokenizer: BERT WordPiece (characters, ##continuations and frequent words such as numbers), or every character seen at least twice (one token per character)"
        },
    )
    max_length: int = field(
        default=256, metadata={"help": "tokens per record (per window with long_records chunks); longer records are cut"}
    )
    truncation: str = field(
        default="head",
        metadata={
            "help": "head|tail|head+tail: which tokens of a longer record are kept; head+tail keeps the first quarter "
            "of the text tokens from the start and the rest from the end (Sun et al. 2019)"
        },
    )
    long_records: str = field(
        default="truncate",
        metadata={
            "help": "truncate|chunks: chunks reads every record as overlapping windows of max_length tokens; each "
            "window is a training sample with its record's label (long records weigh more), and evaluation and "
            "predict pool the windows' logits per record (see pool)"
        },
    )
    stride: int = field(
        default=0,
        metadata={
            "help": "with long_records chunks: tokens that consecutive windows share (Hugging Face's stride with "
            "return_overflowing_tokens); less than max_length minus the special tokens"
        },
    )
    pool: str = field(
        default="", metadata={"help": "with long_records chunks: mean|max of the windows' logits per record (default mean)"}
    )
    epochs: int = field(default=2, metadata={"help": "passes over the training data"})
    max_steps: int = field(default=0, metadata={"help": "stop after this many optimizer steps (0: no limit)"})
    seed: int = field(default=42, metadata={"help": "seed for initialisation and data order"})
    precision: str = field(
        default="auto", metadata={"help": "auto|fp16|bf16|fp32; auto follows the DeepSpeed JSON and the hardware"}
    )
    log_every: int = field(default=10, metadata={"help": "log training metrics every N optimizer steps"})
    eval_every: int = field(default=50, metadata={"help": "evaluate on dev every N optimizer steps (0: only at the end)"})
    save_every: int = field(default=0, metadata={"help": "save a checkpoint every N optimizer steps (0: only at the end)"})
    keep_checkpoints: int = field(
        default=2, metadata={"help": "keep the newest N complete checkpoints (plus the best one with best_metric)"}
    )
    best_metric: str = field(
        default="",
        metadata={
            "help": "export the checkpoint with the best dev value of this metric instead of the last one, and keep it; "
            "judged at the checkpointed evaluations (one of the task's metrics; another is refused, naming them)"
        },
    )
    early_stopping_patience: int = field(
        default=0,
        metadata={
            "help": "end training after this many checkpointed dev evaluations without a new best_metric value, exporting the best checkpoint (0: off; needs best_metric)"
        },
    )
    resume: str = field(
        default="",
        metadata={
            "help": "auto (newest complete checkpoint, error if none), if-present (same, else start fresh) or a checkpoint directory"
        },
    )
    eval_batch_size: int = field(default=32, metadata={"help": "per-rank batch size for evaluation"})
    output_dir: str = field(default="runs", metadata={"help": "parent directory of run directories"})
    run_name: str = field(default="", metadata={"help": "run directory name (default: chosen by rank 0 from the clock)"})
    cache_dir: str = field(default="", metadata={"help": "tokenized-data cache (default: OUTPUT_DIR/cache)"})
    max_unk_fraction: float = field(
        default=0.02, metadata={"help": "refuse to train when more of the training tokens than this are the unknown token"}
    )
    warmup_ratio: float = field(
        default=0.1, metadata={"help": 'warmup share of all steps, used where the scheduler\'s warmup_num_steps is "auto"'}
    )
    global_batch: int = field(
        default=0,
        metadata={
            "help": 'examples per optimizer step where the DeepSpeed JSON\'s train_batch_size is "auto" or absent; accumulation is then derived from the world size (0: the JSON decides)'
        },
    )
    micro_batch: int = field(
        default=0,
        metadata={
            "help": 'per-rank micro batch where the JSON\'s train_micro_batch_size_per_gpu is "auto" (0: derived; with accumulation also "auto", the largest divisor of the per-rank batch up to 8)'
        },
    )
    lr_scaling: str = field(
        default="none",
        metadata={
            "help": "none|linear|sqrt: multiply the JSON's learning rates by (global batch / reference_batch) or its square root"
        },
    )
    reference_batch: int = field(
        default=0, metadata={"help": "global batch the JSON's learning rate was tuned for (needed by --lr-scaling linear|sqrt)"}
    )
    dist_timeout_minutes: float = field(
        default=10.0, metadata={"help": "collective timeout: a rank waiting longer than this fails the job"}
    )
    rank0_wait_minutes: float = field(
        default=240.0,
        metadata={
            "help": "how long the other ranks wait for rank 0's one-off work (reading and tokenizing the data, "
            "finishing checkpoints, the export); the collective timeout bounds training's collectives"
        },
    )
    tensorboard: int = field(
        default=1,
        metadata={"help": "1: also write TensorBoard event files to RUN_DIR/tensorboard (rank 0); 0: metrics.jsonl only"},
    )
    gradient_checkpointing: int = field(
        default=0,
        metadata={
            "help": "1: recompute each layer's activations in the backward pass instead of keeping them (the model's gradient_checkpointing_enable): far less activation memory for about a third more compute; same results"
        },
    )
    flops_profiler_step: int = field(
        default=0,
        metadata={
            "help": "run DeepSpeed's flops profiler once, when the engine has completed this many optimizer steps, writing RUN_DIR/flops_profile.txt (0: off)"
        },
    )

    group_by_length: int = field(
        default=1,  # measured: 2x less compute where lengths vary as in notes, macro-F1 within seed noise (README)
        metadata={
            "help": "1: micro-batches of records of similar length (Hugging Face's group_by_length: seeded mega-batches of 50 optimizer steps sorted by length), far less padding; 0: random micro-batches"
        },
    )

    def __post_init__(self):
        def need(ok: bool, key: str, expected: str):
            if not ok:
                raise ConfigError(f"training config: '{key}' = {getattr(self, key)!r}, expected {expected}")

        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            expected = {"str": (str,), "int": (int,), "float": (int, float)}[f.type]
            if isinstance(value, bool) or not isinstance(value, expected):
                raise ConfigError(f"training config: '{f.name}' = {value!r}, expected {f.type}")
        need(self.vocabulary in VOCABULARIES, "vocabulary", " or ".join(VOCABULARIES))
        need(self.max_length >= 8, "max_length", "at least 8")
        need(self.truncation in TRUNCATIONS, "truncation", " or ".join(TRUNCATIONS))
        need(self.long_records in LONG_RECORDS, "long_records", " or ".join(LONG_RECORDS))
        chunks = self.long_records == "chunks"
        need(
            not chunks or self.truncation == "head",
            "truncation",
            "the default head with long_records chunks (windows keep every token)",
        )
        need(self.stride >= 0, "stride", ">= 0")
        need(self.stride == 0 or chunks, "stride", "0 unless long_records is chunks (only windows overlap)")
        need(self.stride < self.max_length, "stride", f"less than max_length {self.max_length}")
        need(
            self.pool in ("", *POOLS) and (chunks or not self.pool),
            "pool",
            f"{' or '.join(POOLS)} with long_records chunks, else unset",
        )
        need(self.epochs >= 1, "epochs", "at least 1")
        need(self.max_steps >= 0, "max_steps", ">= 0")
        need(self.precision in PRECISIONS, "precision", " or ".join(PRECISIONS))
        need(self.log_every >= 1, "log_every", "at least 1")
        need(self.eval_every >= 0, "eval_every", ">= 0")
        need(self.save_every >= 0, "save_every", ">= 0")
        need(self.keep_checkpoints >= 1, "keep_checkpoints", "at least 1")
        need(
            not self.best_metric or (self.eval_every and self.save_every and self.save_every % self.eval_every == 0),
            "save_every",
            "a multiple of eval_every (both > 0) when best_metric is set, so the best step has a checkpoint",
        )
        need(self.early_stopping_patience >= 0, "early_stopping_patience", ">= 0")
        need(
            not self.early_stopping_patience or self.best_metric,
            "early_stopping_patience",
            "0 unless best_metric is set (early stopping watches the best_metric's dev value)",
        )
        need(self.eval_batch_size >= 1, "eval_batch_size", "at least 1")
        need(0.0 <= self.max_unk_fraction <= 1.0, "max_unk_fraction", "between 0 and 1")
        need(0.0 <= self.warmup_ratio < 1.0, "warmup_ratio", "in [0, 1)")
        need(self.global_batch >= 0, "global_batch", ">= 0")
        need(self.micro_batch >= 0, "micro_batch", ">= 0")
        need(self.lr_scaling in LR_SCALING, "lr_scaling", " or ".join(LR_SCALING))
        need(
            self.lr_scaling == "none" or self.reference_batch >= 1, "reference_batch", "at least 1 with lr_scaling linear or sqrt"
        )
        need(self.dist_timeout_minutes > 0, "dist_timeout_minutes", "> 0")
        need(self.rank0_wait_minutes > 0, "rank0_wait_minutes", "> 0")
        need(self.tensorboard in (0, 1), "tensorboard", "0 or 1")
        need(self.gradient_checkpointing in (0, 1), "gradient_checkpointing", "0 or 1")
        need(self.flops_profiler_step >= 0, "flops_profiler_step", ">= 0")
        need(self.group_by_length in (0, 1), "group_by_length", "0 or 1")
        need(bool(self.train_file), "train_file", "a file path")
        need(bool(self.dev_file), "dev_file", "a file path")
        need(bool(self.text_column), "text_column", "a column name")
        need(bool(self.label_column), "label_column", "a column name")

    def cache_directory(self) -> str:
        return cache_directory(self.cache_dir, self.output_dir)

    @classmethod
    def from_sources(cls, json_file: str | None = None, overrides: dict | None = None) -> TrainConfig:
        """Defaults, then a JSON file of fields, then command-line overrides."""
        values = {}
        if json_file:
            values = load_json(json_file)
            known = {f.name for f in dataclasses.fields(cls)}
            for key in values:
                if key not in known:
                    raise ConfigError(unknown_key_message(json_file, key, known))
        values.update(overrides or {})
        return cls(**values)


def cache_directory(cache_dir: str, output_dir: str) -> str:
    """Where tokenized data and built tokenizers are cached: --cache-dir, else OUTPUT_DIR/cache."""
    return cache_dir or str(Path(output_dir) / "cache")


# Hugging Face Trainer's names for the same settings, accepted as aliases (the habits users bring).
HF_ALIASES = {
    "ds_config": ["--deepspeed"],
    "epochs": ["--num_train_epochs"],
    "eval_batch_size": ["--per_device_eval_batch_size"],
    "micro_batch": ["--per_device_train_batch_size"],
    "resume": ["--resume_from_checkpoint"],
    "model": ["--model_name_or_path"],
    "log_every": ["--logging_steps"],
    "eval_every": ["--eval_steps"],
    "save_every": ["--save_steps"],
    "keep_checkpoints": ["--save_total_limit"],
    "best_metric": ["--metric_for_best_model"],
}


OPTION_TYPES = {"str": str, "int": int, "float": float}  # a TrainConfig field's annotation -> argparse type


def spellings(name: str) -> list[str]:
    """--max-length and --max_length: both spellings of an option name (HF scripts use underscores)."""
    return list(dict.fromkeys(["--" + name.replace("_", "-"), "--" + name.replace("-", "_")]))


# Options with a fixed set of values, shown by --help (the task's names come from the task registry).
CHOICES = {
    "vocabulary": VOCABULARIES,
    "truncation": TRUNCATIONS,
    "long_records": LONG_RECORDS,
    "pool": POOLS,
    "precision": PRECISIONS,
    "lr_scaling": LR_SCALING,
}


def add_train_options(p, choices: dict[str, list[str]] | None = None) -> None:
    """Every TrainConfig field as an option, in both spellings and under its Hugging Face alias;
    `choices` adds fixed value sets known above this room (the registered tasks) to the help."""
    p.add_argument("--config", help="JSON file of training-config fields (command-line options override it)")
    shown = {**CHOICES, **(choices or {})}
    for f in dataclasses.fields(TrainConfig):
        kind = OPTION_TYPES[f.type]
        listed = f"choices: {', '.join(shown[f.name])}; " if f.name in shown else ""
        p.add_argument(
            *spellings(f.name),
            *HF_ALIASES.get(f.name, []),
            dest=f.name,
            type=kind,
            default=None,
            help=f"{f.metadata['help']} ({listed}default: {f.default!r})",
        )


def unknown_options_message(unknown: list[str], parser) -> str:
    """`unrecognized arguments: ...`, with the nearest known option for each misspelt one (--epoch -> --epochs)."""
    import difflib

    known = [s for action in parser._actions for s in action.option_strings]  # argparse keeps no public list
    hints = []
    for arg in unknown:
        name = arg.split("=", 1)[0]
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.75) if name.startswith("--") else []
        if close:
            hints.append(f"{name}: did you mean {close[0]}?")
    return f"unrecognized arguments: {' '.join(unknown)}" + (f" ({'; '.join(hints)})" if hints else "")
