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
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from .base import ConfigError, is_text_encoding, load_json, read_utf8, unknown_key_message, write_text

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # pipeline/
TINY_MODEL_DIR = PACKAGE_DIR / "models" / "tiny-bert"
SAMPLE_DATA_DIR = PACKAGE_DIR / "sample_data"
# pipeline/ds_configs links to the repository's ds_configs/ (a wheel holds copies): the default run
# finds its config from any working directory, installed or not.
DS_CONFIG_DIR = PACKAGE_DIR / "ds_configs"
DEFAULT_DS_CONFIG = DS_CONFIG_DIR / "small_zero2.json"


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
# The default: higher mean dev and test macro-F1 on text with real notes' character statistics
# (generate_sample_data --mode realistic, 3 seeds; docs/data-and-models.md), as on real text.
DEFAULT_VOCABULARY = "char"
DEFAULT_MIN_CHAR_COUNT = 2  # characters seen fewer times in training read as [UNK] (data/tokenizer.py)
LR_SCALING = ("none", "linear", "sqrt")
# --report-to: tracker name -> the module it needs (installed by the extras of the same name, tensorboard always).
TRACKERS = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}
TRACKER_INSTALL = {
    "tensorboard": "pip install tensorboard",
    "mlflow": "pip install '.[mlflow]'",
    "wandb": "pip install '.[wandb]'",
}
# Hugging Face's lr_scheduler_type names this pipeline maps to DeepSpeed schedulers (ds_config.py).
LR_SCHEDULERS = ("linear", "cosine", "constant_with_warmup", "constant")
BASELINES = ("tfidf", "none")
MASKINGS = ("whole-word", "token")  # data/masking.py
FILE_ACCESS = ("group", "owner", "umask")  # core/base.py: close_new_files


@dataclass
class TrainConfig:
    """What to train on, which model, where results go, and how often to log/eval/save.

    Batch sizes, accumulation, optimizer, scheduler and precision live in the DeepSpeed JSON.
    """

    ds_config: str = field(default=str(DEFAULT_DS_CONFIG), metadata={"help": "DeepSpeed JSON config"})
    train_file: str = field(
        default=str(SAMPLE_DATA_DIR / "train.jsonl"), metadata={"help": "training data (.jsonl, .json, .csv, .tsv or .parquet)"}
    )
    dev_file: str = field(
        default="",
        metadata={
            "help": "dev data, evaluated during and after training (needed with a --train-file of your own, unless --val-size holds part of it out; the bundled sample's dev set goes with the bundled training set)"
        },
    )
    val_size: float = field(
        default=0.0,
        metadata={
            "help": "hold out this fraction of --train-file as the dev set instead of a --dev-file: stratified by label, seeded by --seed, the held-out line numbers written to RUN_DIR/val_split.json (0: off)"
        },
    )
    test_file: str = field(default="", metadata={"help": "optional test data, evaluated once after training"})
    encoding: str = field(
        default="utf-8",
        metadata={
            "help": "text encoding of the data files (.jsonl, .json, .csv, .tsv, .txt), e.g. gb18030 for files exported as GBK; "
            "run files, hostfiles, env files and DeepSpeed JSON are always UTF-8"
        },
    )
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
            "help": "wordpiece|char: the vocabulary built from the training texts when the model directory has no tokenizer: BERT WordPiece (characters, ##continuations and frequent words such as numbers), or one token per character (both keep the characters seen at least min_char_count times)"
        },
    )
    min_char_count: int = field(
        default=DEFAULT_MIN_CHAR_COUNT,
        metadata={
            "help": "in a vocabulary built from the training texts, characters seen fewer times than this in training read as [UNK] (1: keep every character)"
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
    file_access: str = field(
        default="group",
        metadata={
            "help": "who may read what the run writes (run directory, cache: patients' text): group (owner and group, "
            "whatever the umask: directories 0750, files 0640 under umask 022), owner (owner only) or umask (as the umask says)"
        },
    )
    max_unk_fraction: float = field(
        default=0.02, metadata={"help": "refuse to train when more of the training tokens than this are the unknown token"}
    )
    # Hugging Face Trainer's hyperparameters: they fill the DeepSpeed JSON's "auto" values (unset: the
    # default in the help); a flag that contradicts a number in the JSON is refused (ds_config.py).
    learning_rate: float | None = field(
        default=None,
        metadata={
            "help": "peak learning rate (default: 5e-5 for a model directory with weights, HF's default for fine-tuning; 1e-3 for a model initialised from its config alone, like the bundled tiny model)"
        },
    )
    weight_decay: float | None = field(default=None, metadata={"help": "AdamW weight decay (default: 0.01)"})
    adam_beta1: float | None = field(default=None, metadata={"help": "AdamW beta1 (default: 0.9)"})
    adam_beta2: float | None = field(default=None, metadata={"help": "AdamW beta2 (default: 0.999)"})
    adam_epsilon: float | None = field(default=None, metadata={"help": "AdamW epsilon (default: 1e-8)"})
    lr_scheduler_type: str | None = field(
        default=None,
        metadata={
            "help": "learning-rate schedule where the JSON has no scheduler, as HF Trainer: linear (DeepSpeed's WarmupDecayLR), cosine (WarmupCosineLR) or constant_with_warmup (WarmupLR), each with a linear warmup, or constant (no scheduler) (default: linear)"
        },
    )
    warmup_ratio: float | None = field(
        default=None,
        metadata={"help": 'warmup share of all steps where the scheduler\'s warmup_num_steps is "auto" (default: 0.1)'},
    )
    warmup_steps: int | None = field(
        default=None, metadata={"help": 'warmup steps where the scheduler\'s warmup_num_steps is "auto"; overrides warmup_ratio'}
    )
    max_grad_norm: float | None = field(
        default=None,
        metadata={"help": 'gradient clipping where the JSON\'s gradient_clipping is "auto" or absent (default: 1.0)'},
    )
    gradient_accumulation_steps: int = field(
        default=0,
        metadata={"help": 'accumulation steps where the JSON\'s gradient_accumulation_steps is "auto" (0: derived)'},
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
    report_to: str = field(
        default="tensorboard",
        metadata={
            "help": "where rank 0 also reports the run, as Hugging Face's report_to: a comma-separated list of "
            "tensorboard (RUN_DIR/tensorboard), mlflow (MLFLOW_TRACKING_URI, else sqlite:///OUTPUT_DIR/mlflow.db), "
            "wandb (WANDB_PROJECT, WANDB_MODE=offline), or all (every one installed) or none; metrics.jsonl is always written"
        },
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

    baseline: str = field(
        default="tfidf",
        metadata={
            "help": "tfidf: fit TF-IDF (character 1-3-grams) + logistic regression (one model per label for multi_label, ridge for regression) "
            "on the training split in a background process on rank 0, cached per data, and report it beside the model's dev and "
            "test metrics (RUN_DIR/eval/baseline.json, eval_results.json); none: no baseline"
        },
    )
    baseline_max_records: int = field(
        default=200_000,
        metadata={"help": "skip the baseline, with a note, when the training split has more records than this"},
    )
    text_file: str = field(
        default="",
        metadata={
            "help": "pretrain: unlabelled records, one file or several separated by commas (.jsonl/.json/.csv/.tsv/.parquet "
            "with text_column, or .txt with one record per line), read and cached as training files are"
        },
    )
    heldout_fraction: float = field(
        default=0.05,
        metadata={
            "help": "pretrain: share of the records (seeded, at least one) held out to score masked-LM loss and perplexity on"
        },
    )
    masking: str = field(
        default="whole-word",
        metadata={
            "help": "pretrain: whole-word (every token of a word segmented by jieba is masked together, as in Chinese "
            "RoBERTa-wwm) or token (each token on its own, as in the original BERT)"
        },
    )
    mask_probability: float = field(
        default=0.15,
        metadata={
            "help": "pretrain: share of each record's tokens predicted (of them 8 in 10 become [MASK], 1 in 10 a random token, 1 in 10 stay)"
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
            kind, optional = option_type(f)
            if optional and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else kind):
                raise ConfigError(f"training config: '{f.name}' = {value!r}, expected {kind.__name__}")
        need(self.vocabulary in VOCABULARIES, "vocabulary", " or ".join(VOCABULARIES))
        need(self.min_char_count >= 1, "min_char_count", "at least 1")
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
        need(self.file_access in FILE_ACCESS, "file_access", " or ".join(FILE_ACCESS))
        need(0.0 <= self.max_unk_fraction <= 1.0, "max_unk_fraction", "between 0 and 1")
        need(self.learning_rate is None or self.learning_rate > 0, "learning_rate", "> 0")
        need(self.weight_decay is None or self.weight_decay >= 0, "weight_decay", ">= 0")
        for beta in ("adam_beta1", "adam_beta2"):
            need(getattr(self, beta) is None or 0 <= getattr(self, beta) < 1, beta, "in [0, 1)")
        need(self.adam_epsilon is None or self.adam_epsilon > 0, "adam_epsilon", "> 0")
        need(self.lr_scheduler_type in (None, *LR_SCHEDULERS), "lr_scheduler_type", " or ".join(LR_SCHEDULERS))
        need(self.warmup_ratio is None or 0.0 <= self.warmup_ratio < 1.0, "warmup_ratio", "in [0, 1)")
        need(self.warmup_steps is None or self.warmup_steps >= 0, "warmup_steps", ">= 0")
        need(self.max_grad_norm is None or self.max_grad_norm >= 0, "max_grad_norm", ">= 0")
        need(self.gradient_accumulation_steps >= 0, "gradient_accumulation_steps", ">= 0")
        need(self.global_batch >= 0, "global_batch", ">= 0")
        need(self.micro_batch >= 0, "micro_batch", ">= 0")
        need(self.lr_scaling in LR_SCALING, "lr_scaling", " or ".join(LR_SCALING))
        need(
            self.lr_scaling == "none" or self.reference_batch >= 1, "reference_batch", "at least 1 with lr_scaling linear or sqrt"
        )
        need(self.dist_timeout_minutes > 0, "dist_timeout_minutes", "> 0")
        need(self.rank0_wait_minutes > 0, "rank0_wait_minutes", "> 0")
        need(
            self.report_to in ("all", "none") or set(self.trackers()) <= set(TRACKERS),
            "report_to",
            f"all, none, or a comma-separated list of {', '.join(TRACKERS)}",
        )
        need(self.gradient_checkpointing in (0, 1), "gradient_checkpointing", "0 or 1")
        need(self.flops_profiler_step >= 0, "flops_profiler_step", ">= 0")
        need(self.baseline in BASELINES, "baseline", " or ".join(BASELINES))
        need(self.baseline_max_records >= 0, "baseline_max_records", ">= 0")
        need(self.group_by_length in (0, 1), "group_by_length", "0 or 1")
        need(bool(self.train_file), "train_file", "a file path")
        need(  # the run directory is OUTPUT_DIR/RUN_NAME: a path would put it (and its deletions) elsewhere
            self.run_name in ("", Path(self.run_name).name) and self.run_name != "..",
            "run_name",
            "a name, not a path (no '/', not '..'): the run directory is OUTPUT_DIR/RUN_NAME",
        )
        need(0.0 <= self.val_size < 1.0, "val_size", "a fraction in [0, 1) of the training records")
        need(not (self.val_size and self.dev_file), "val_size", "0 when a dev_file is given (one dev set)")
        if not self.dev_file and not self.val_size:
            # Never pair the user's training data with the bundled sample's dev set.
            need(
                self.train_file == TrainConfig.train_file,
                "dev_file",
                f"a file path: train_file {self.train_file} is not the bundled sample, so give its dev set "
                "(--dev-file) or hold part of it out (--val-size 0.1)",
            )
            self.dev_file = str(SAMPLE_DATA_DIR / "dev.jsonl")
        need(is_text_encoding(self.encoding), "encoding", "a text encoding Python knows, e.g. utf-8 or gb18030")
        need(bool(self.text_column), "text_column", "a column name")
        need(bool(self.label_column), "label_column", "a column name")
        need(0.0 < self.heldout_fraction < 1.0, "heldout_fraction", "in (0, 1)")
        need(self.masking in MASKINGS, "masking", " or ".join(MASKINGS))
        need(0.0 < self.mask_probability < 1.0, "mask_probability", "in (0, 1)")

    def trackers(self) -> list[str]:
        """The trackers --report-to names ("all": every one whose package is installed, as Hugging Face does)."""
        if self.report_to == "none":
            return []
        if self.report_to == "all":
            import importlib.util

            return [name for name, module in TRACKERS.items() if importlib.util.find_spec(module)]
        return list(dict.fromkeys(name.strip() for name in self.report_to.split(",") if name.strip()))

    def cache_directory(self) -> str:
        return cache_directory(self.cache_dir, self.output_dir)

    @classmethod
    def from_sources(cls, config_file: str | None = None, overrides: dict | None = None) -> TrainConfig:
        """Defaults, then a YAML or JSON file of fields, then command-line overrides."""
        values = {}
        if config_file:
            values = read_run_file(config_file)
            known = {f.name for f in dataclasses.fields(cls)}
            for key in values:
                if key not in known:
                    raise ConfigError(unknown_key_message(config_file, key, known))
        values.update(overrides or {})
        return cls(**values)

    def with_absolute_paths(self) -> TrainConfig:
        """This config with every file and directory absolute, against this process's working directory:
        the launcher resolves them once, for ranks that may start in another directory or on another host."""
        return dataclasses.replace(self, **{name: absolute_paths(name, getattr(self, name)) for name in PATH_FIELDS})

    def run_file(self) -> dict:
        """The options that repeat this run (`launch RUN_DIR/run.yaml`): every field set, with
        absolute paths; not the run's name or a checkpoint to resume (a repeat is a new run)."""
        values = dataclasses.asdict(self.with_absolute_paths())
        return {key: value for key, value in values.items() if key not in ("run_name", "resume") and value is not None}


# Fields that name files or directories (some also take a word: per-label, balanced, auto).
PATH_FIELDS = (
    "ds_config",
    "train_file",
    "dev_file",
    "test_file",
    "text_file",
    "model",
    "output_dir",
    "cache_dir",
    "class_weights",
    "threshold",
    "resume",
)


def absolute_paths(name: str, value: str) -> str:
    """A path field's value with its path(s) absolute: text_file's comma-separated files each, the
    JSON files threshold and class_weights may name, resume's checkpoint (not auto or if-present)."""
    if not value or (name in ("threshold", "class_weights") and not value.endswith(".json")):
        return value
    if name == "resume" and value in ("auto", "if-present"):
        return value
    parts = value.split(",") if name == "text_file" else [value]
    return ",".join(os.path.abspath(os.path.expanduser(part.strip())) for part in parts)


def write_run_file(path: Path, values: dict) -> None:
    """A run file that `launch PATH` reads back (YAML: options in the order given)."""
    import yaml

    write_text(path, yaml.safe_dump(values, sort_keys=False, allow_unicode=True))


def yaml_loader():
    """PyYAML's safe loader, reading numbers with an exponent as YAML 1.2 (and JSON, argparse) do:
    PyYAML follows YAML 1.1, where 2e-5 (no dot) and 1.0e5 (no sign) are strings."""
    import yaml

    class Loader(yaml.SafeLoader):  # a subclass: PyYAML's own loader is left as it is
        pass

    exponent = re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$")
    Loader.add_implicit_resolver("tag:yaml.org,2002:float", exponent, list("-+0123456789"))
    return Loader


def read_run_file(path: str) -> dict:
    """A run file: YAML (.yaml/.yml) or JSON (.json) mapping option names to values."""
    if Path(path).suffix.lower() not in (".yaml", ".yml"):
        values = load_json(path)
    else:
        import yaml

        try:
            values = yaml.load(read_utf8(path), Loader=yaml_loader())
        except FileNotFoundError:
            raise ConfigError(f"run file {path} not found") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of option names to values, got {type(values).__name__}")
    return {str(key).replace("-", "_"): value for key, value in values.items()}


def mlflow_uri(cfg: TrainConfig, environ=os.environ) -> str:
    """MLFLOW_TRACKING_URI, else a SQLite store in the output directory (MLflow's file store is deprecated)."""
    return environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(cfg.output_dir).resolve() / 'mlflow.db'}"


def cache_directory(cache_dir: str, output_dir: str) -> str:
    """Where tokenized data and built tokenizers are cached: --cache-dir, else OUTPUT_DIR/cache."""
    return cache_dir or str(Path(output_dir) / "cache")


# Hugging Face Trainer's names for the same settings, accepted as aliases (the habits users bring).
HF_ALIASES = {
    "ds_config": ["--deepspeed"],
    "epochs": ["--num_train_epochs", "--num-train-epochs"],
    "eval_batch_size": ["--per_device_eval_batch_size", "--per-device-eval-batch-size"],
    "micro_batch": ["--per_device_train_batch_size", "--per-device-train-batch-size"],
    "resume": ["--resume_from_checkpoint", "--resume-from-checkpoint"],
    "model": ["--model_name_or_path", "--model-name-or-path"],
    "log_every": ["--logging_steps", "--logging-steps"],
    "eval_every": ["--eval_steps", "--eval-steps"],
    "save_every": ["--save_steps", "--save-steps"],
    "keep_checkpoints": ["--save_total_limit", "--save-total-limit"],
    "best_metric": ["--metric_for_best_model", "--metric-for-best-model"],
}


OPTION_TYPES = {"str": str, "int": int, "float": float}  # a TrainConfig field's annotation -> its type


def option_type(f: dataclasses.Field) -> tuple[type, bool]:
    """A TrainConfig field's type and whether it may be None (unset: "auto" values get the default)."""
    name, optional = f.type.removesuffix(" | None"), f.type.endswith(" | None")
    return OPTION_TYPES[name], optional


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
    "lr_scheduler_type": LR_SCHEDULERS,
    "baseline": BASELINES,
    "masking": MASKINGS,
}

# `pretrain` is `train` with the masked-LM task, every long record read in windows.
PRETRAIN_SETTINGS = {"task": "masked_lm", "long_records": "chunks"}


def command_settings(command: str, overrides: dict) -> dict:
    """The options of `command` (train or pretrain): pretrain's settings under the user's, its task fixed."""
    if command != "pretrain":
        return overrides
    if overrides.get("task", "masked_lm") != "masked_lm":
        raise ConfigError(
            f"pretrain: --task {overrides['task']}: pretrain trains a masked LM (task masked_lm); use train for {overrides['task']}"
        )
    return {**PRETRAIN_SETTINGS, **overrides}


# What decides the DeepSpeed config besides the JSON (check-config takes these alone).
DS_CONFIG_OPTIONS = (
    "precision",
    "global_batch",
    "micro_batch",
    "gradient_accumulation_steps",
    "learning_rate",
    "weight_decay",
    "adam_beta1",
    "adam_beta2",
    "adam_epsilon",
    "lr_scheduler_type",
    "warmup_ratio",
    "warmup_steps",
    "max_grad_norm",
    "lr_scaling",
    "reference_batch",
)


def add_train_options(p, choices: dict[str, list[str]] | None = None, only: tuple[str, ...] = ()) -> None:
    """Every TrainConfig field (or those in `only`) as an option, in both spellings and under its
    Hugging Face alias; `choices` adds fixed value sets known above this room (the registered tasks)."""
    if not only:
        p.add_argument("--config", help="YAML or JSON file of training-config fields (command-line options override it)")
    shown = {**CHOICES, **(choices or {})}
    for f in dataclasses.fields(TrainConfig):
        if only and f.name not in only:
            continue
        kind, optional = option_type(f)
        listed = f"choices: {', '.join(shown[f.name])}" if f.name in shown else ""
        default = "" if optional else f"default: {f.default!r}"  # an unset one's default is in its help
        note = "; ".join(x for x in (listed, default) if x)
        p.add_argument(
            *spellings(f.name),
            *HF_ALIASES.get(f.name, []),
            dest=f.name,
            type=kind,
            default=None,
            help=f"{f.metadata['help']}" + (f" ({note})" if note else ""),
        )
    # HF Trainer's precision switches, the same as --precision fp16|bf16.
    for precision in ("fp16", "bf16"):
        p.add_argument(f"--{precision}", dest="precision", action="store_const", const=precision, help=f"--precision {precision}")


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
