"""Configuration: the training dataclass and the DeepSpeed JSON, loaded and checked once.

Each setting has one owner. The DeepSpeed JSON owns batch size, accumulation, precision,
optimizer, scheduler, clipping and ZeRO; `TrainConfig` owns data, model, paths and the loop's
cadence. Everything here runs before any process group exists, so a bad config fails fast with a
message that names the file and key, and the rest of the package trusts what it gets.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
TINY_MODEL_DIR = PACKAGE_DIR / "models" / "tiny-bert"
SAMPLE_DATA_DIR = PACKAGE_DIR / "sample_data"


class ConfigError(Exception):
    """Bad user input: the message names the file, key or value and what was expected."""


def load_json(path: str | os.PathLike) -> dict:
    """Read a JSON object, reporting syntax errors with file, line and column."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: file not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: JSON syntax error at line {e.lineno}, column {e.colno}: {e.msg}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object at the top level, got {type(data).__name__}")
    return data


def _unknown_key_error(where: str, key: str, known) -> ConfigError:
    hint = difflib.get_close_matches(key, list(known), n=1)
    suggestion = f" (did you mean '{hint[0]}'?)" if hint else ""
    return ConfigError(f"{where}: unknown key '{key}'{suggestion}")


# ----------------------------------------------------------------------------------------------
# The training config
# ----------------------------------------------------------------------------------------------

PRECISIONS = ("auto", "fp16", "bf16", "fp32")


@dataclass
class TrainConfig:
    """What to train on, which model, where results go, and how often to log/eval/save.

    Batch sizes, accumulation, optimizer, scheduler and precision live in the DeepSpeed JSON.
    """

    ds_config: str = field(default="ds_configs/small_zero2.json", metadata={"help": "DeepSpeed JSON config"})
    train_file: str = field(default=str(SAMPLE_DATA_DIR / "train.jsonl"), metadata={"help": "training data (.jsonl or .csv)"})
    dev_file: str = field(default=str(SAMPLE_DATA_DIR / "dev.jsonl"), metadata={"help": "dev data, evaluated during and after training"})
    test_file: str = field(default="", metadata={"help": "optional test data, evaluated once after training"})
    text_column: str = field(default="text", metadata={"help": "name of the text column"})
    label_column: str = field(default="label", metadata={"help": "name of the label column (string labels)"})
    model: str = field(default=str(TINY_MODEL_DIR), metadata={"help": "model directory: with weights it is fine-tuned, with config.json alone it is randomly initialised; without tokenizer files a WordPiece vocabulary is built from the training texts"})
    max_length: int = field(default=256, metadata={"help": "tokens per record; longer records are truncated"})
    epochs: int = field(default=2, metadata={"help": "passes over the training data"})
    max_steps: int = field(default=0, metadata={"help": "stop after this many optimizer steps (0: no limit)"})
    seed: int = field(default=42, metadata={"help": "seed for initialisation and data order"})
    precision: str = field(default="auto", metadata={"help": "auto|fp16|bf16|fp32; auto follows the DeepSpeed JSON and the hardware"})
    log_every: int = field(default=10, metadata={"help": "log training metrics every N optimizer steps"})
    eval_every: int = field(default=50, metadata={"help": "evaluate on dev every N optimizer steps (0: only at the end)"})
    save_every: int = field(default=0, metadata={"help": "save a checkpoint every N optimizer steps (0: only at the end)"})
    eval_batch_size: int = field(default=32, metadata={"help": "per-rank batch size for evaluation"})
    output_dir: str = field(default="runs", metadata={"help": "parent directory of run directories"})
    run_name: str = field(default="", metadata={"help": "run directory name (default: chosen by rank 0 from the clock)"})
    cache_dir: str = field(default="", metadata={"help": "tokenized-data cache (default: OUTPUT_DIR/cache)"})
    max_unk_fraction: float = field(default=0.02, metadata={"help": "refuse to train when more of the training tokens than this are the unknown token"})
    warmup_ratio: float = field(default=0.1, metadata={"help": "warmup share of all steps, used where the scheduler's warmup_num_steps is \"auto\""})
    dist_timeout_minutes: float = field(default=10.0, metadata={"help": "collective timeout: a rank waiting longer than this fails the job"})

    def __post_init__(self):
        def need(ok: bool, key: str, expected: str):
            if not ok:
                raise ConfigError(f"training config: '{key}' = {getattr(self, key)!r}, expected {expected}")

        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            expected = {"str": (str,), "int": (int,), "float": (int, float)}[f.type]
            if isinstance(value, bool) or not isinstance(value, expected):
                raise ConfigError(f"training config: '{f.name}' = {value!r}, expected {f.type}")
        need(self.max_length >= 8, "max_length", "at least 8")
        need(self.epochs >= 1, "epochs", "at least 1")
        need(self.max_steps >= 0, "max_steps", ">= 0")
        need(self.precision in PRECISIONS, "precision", " or ".join(PRECISIONS))
        need(self.log_every >= 1, "log_every", "at least 1")
        need(self.eval_every >= 0, "eval_every", ">= 0")
        need(self.save_every >= 0, "save_every", ">= 0")
        need(self.eval_batch_size >= 1, "eval_batch_size", "at least 1")
        need(0.0 <= self.max_unk_fraction <= 1.0, "max_unk_fraction", "between 0 and 1")
        need(0.0 <= self.warmup_ratio < 1.0, "warmup_ratio", "in [0, 1)")
        need(self.dist_timeout_minutes > 0, "dist_timeout_minutes", "> 0")
        need(bool(self.train_file), "train_file", "a file path")
        need(bool(self.dev_file), "dev_file", "a file path")
        need(bool(self.text_column), "text_column", "a column name")
        need(bool(self.label_column), "label_column", "a column name")

    @classmethod
    def from_sources(cls, json_file: str | None = None, overrides: dict | None = None) -> "TrainConfig":
        """Defaults, then a JSON file of fields, then command-line overrides."""
        values = {}
        if json_file:
            values = load_json(json_file)
            known = {f.name for f in dataclasses.fields(cls)}
            for key in values:
                if key not in known:
                    raise _unknown_key_error(json_file, key, known)
        values.update(overrides or {})
        return cls(**values)


# ----------------------------------------------------------------------------------------------
# The DeepSpeed config
# ----------------------------------------------------------------------------------------------

# Top-level keys DeepSpeed 0.19 reads (deepspeed/runtime/config.py and its sub-configs). DeepSpeed
# itself ignores unknown keys, which turns a typo into a silently different run.
DEEPSPEED_TOP_LEVEL_KEYS = {
    "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
    "optimizer", "scheduler", "fp16", "bf16", "bfloat16", "amp", "torch_autocast", "gradient_clipping",
    "zero_optimization", "zero_allow_untested_optimizer", "zero_force_ds_cpu_optimizer",
    "communication_data_type", "seq_parallel_communication_data_type", "prescale_gradients",
    "gradient_predivide_factor", "gradient_allreduce_op", "sparse_gradients", "steps_per_print",
    "wall_clock_breakdown", "memory_breakdown", "dump_state", "log_level", "disable_allgather",
    "dataloader_drop_last", "activation_checkpointing", "flops_profiler", "tensorboard", "wandb",
    "csv_monitor", "comet", "monitor_config", "comms_logger", "comms_config", "autotuning", "elasticity",
    "data_efficiency", "curriculum_learning", "compression_training", "sparse_attention", "eigenvalue",
    "progressive_layer_drop", "pipeline", "checkpoint", "data_types", "aio", "nebula",
    "quantize_training", "weight_quantization", "hybrid_engine", "compile", "timers",
    "tensor_parallel", "expert_parallel", "use_data_before_expert_parallelism", "graph_harvesting",
    "disable_python_gc", "managed_gradient_accumulation", "vocabulary_size", "zenflow",
    "sequence_parallel_size", "mics_shard_size", "mics_hierarchical_params_gather",
}

BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


@dataclass(frozen=True)
class Hardware:
    """What precision the accelerator can run: DeepSpeed's CPU accelerator has no fp16."""

    device: str  # "cpu" or "cuda"
    fp16: bool
    bf16: bool
    name: str = ""

    @classmethod
    def detect(cls) -> "Hardware":
        import torch

        if os.environ.get("DS_ACCELERATOR", "") != "cpu" and torch.cuda.is_available():
            major, _ = torch.cuda.get_device_capability(0)
            return cls("cuda", fp16=True, bf16=major >= 8, name=torch.cuda.get_device_name(0))
        return cls("cpu", fp16=False, bf16=True, name="CPU (DeepSpeed CPU accelerator, gloo)")


def _is_auto(value) -> bool:
    return value is None or value == "auto"


def _positive_int(path: str, key: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{path}: '{key}' = {value!r}, expected a positive integer or \"auto\"")
    return value


def resolve_batch(path: str, ds: dict, world_size: int) -> tuple[int, int, int]:
    """Resolve (train_batch_size, micro_batch_per_gpu, accumulation) against the real world size.

    Two of the three determine the third (as DeepSpeed does); all three must agree.
    """
    given = {k: _positive_int(path, k, ds[k]) for k in BATCH_KEYS if not _is_auto(ds.get(k))}
    total, micro, accum = (given.get(k) for k in BATCH_KEYS)
    shown = ", ".join(f"{k}={ds.get(k, 'missing')}" for k in BATCH_KEYS) + f", world size={world_size}"
    if total is None and micro is not None:
        total = micro * (accum or 1) * world_size
    if micro is None and total is not None:
        micro, rest = divmod(total, (accum or 1) * world_size)
        if rest or micro == 0:
            raise ConfigError(f"{path}: train_batch_size is not divisible by gradient_accumulation_steps x world size ({shown})")
    if micro is None:
        raise ConfigError(f"{path}: set train_micro_batch_size_per_gpu or train_batch_size ({shown})")
    if accum is None:
        accum, rest = divmod(total, micro * world_size)
        if rest or accum == 0:
            raise ConfigError(f"{path}: train_batch_size must be a multiple of train_micro_batch_size_per_gpu x world size ({shown})")
    if total != micro * accum * world_size:
        raise ConfigError(
            f"{path}: inconsistent batch sizes: train_batch_size ({total}) must equal "
            f"train_micro_batch_size_per_gpu ({micro}) x gradient_accumulation_steps ({accum}) x world size "
            f"({world_size}) = {micro * accum * world_size}"
        )
    return total, micro, accum


def _enabled(section) -> bool | str:
    """A precision section's 'enabled': True, False or 'auto'."""
    if not isinstance(section, dict):
        return False
    value = section.get("enabled", False)
    return "auto" if value == "auto" else bool(value)


def resolve_precision(path: str, ds: dict, requested: str, hw: Hardware) -> str:
    """Pick fp16, bf16 or fp32 from the JSON, the --precision option and the hardware.

    An explicit request that the hardware cannot run is refused, never quietly swapped.
    """
    fp16, bf16 = _enabled(ds.get("fp16")), _enabled(ds.get("bf16", ds.get("bfloat16")))
    if fp16 is True and bf16 is True:
        raise ConfigError(f"{path}: fp16.enabled and bf16.enabled are both true; enable at most one")
    if requested != "auto":
        if (requested == "fp16" and fp16 is True) or (requested == "bf16" and bf16 is True) or requested == "fp32":
            pass
        elif fp16 is True or bf16 is True:
            asked = "fp16" if fp16 is True else "bf16"
            raise ConfigError(f"{path}: --precision {requested} contradicts {asked}.enabled=true in the JSON; change one of them")
        choice = requested
    elif fp16 is True:
        choice = "fp16"
    elif bf16 is True:
        choice = "bf16"
    elif fp16 == "auto" or bf16 == "auto":
        # Same rule as HF Trainer: bf16 where the accelerator has it, else fp16. On the CPU fp32,
        # because fp16 does not exist there and bf16 is slow without AMX.
        choice = "fp32" if hw.device == "cpu" else ("bf16" if hw.bf16 and bf16 == "auto" else "fp16" if fp16 == "auto" else "fp32")
    else:
        choice = "fp32"
    if choice == "fp16" and not hw.fp16:
        raise ConfigError(f"{path}: fp16 requested but {hw.name} cannot run it (DeepSpeed's CPU accelerator has no fp16); use --precision bf16 or fp32 there")
    if choice == "bf16" and not hw.bf16:
        raise ConfigError(f"{path}: bf16 requested but {hw.name} has no bf16 (needs compute capability 8.0+); use fp16")
    return choice


def check_top_level_keys(path: str, ds: dict) -> None:
    for key in ds:
        if key not in DEEPSPEED_TOP_LEVEL_KEYS:
            raise _unknown_key_error(path, key, DEEPSPEED_TOP_LEVEL_KEYS)


def resolve_ds_config(path: str, raw: dict, world_size: int, precision: str, hw: Hardware, steps_total: int | None = None) -> dict:
    """Return the DeepSpeed config exactly as the engine will use it ("auto" values filled in)."""
    check_top_level_keys(path, raw)
    ds = copy.deepcopy(raw)
    total, micro, accum = resolve_batch(path, ds, world_size)
    ds.update(train_batch_size=total, train_micro_batch_size_per_gpu=micro, gradient_accumulation_steps=accum)

    zero = ds.get("zero_optimization", {})
    if not isinstance(zero, dict) or zero.get("stage", 0) not in (1, 2, 3):
        raise ConfigError(f"{path}: zero_optimization.stage must be 1, 2 or 3 (got {zero.get('stage') if isinstance(zero, dict) else zero!r}); this pipeline exports from ZeRO shards")
    if not isinstance(ds.get("optimizer"), dict) or "type" not in ds["optimizer"]:
        raise ConfigError(f"{path}: 'optimizer' with a 'type' (e.g. AdamW) is required")

    choice = resolve_precision(path, ds, precision, hw)
    ds.pop("bfloat16", None)
    ds["fp16"] = {**(ds.get("fp16") or {}), "enabled": choice == "fp16"}
    ds["bf16"] = {**(ds.get("bf16") or raw.get("bfloat16") or {}), "enabled": choice == "bf16"}

    clip = ds.get("gradient_clipping", 0.0)
    if _is_auto(clip):
        ds["gradient_clipping"] = 1.0
    auto_steps = ("total_num_steps", "warmup_num_steps")  # filled by fill_schedule once the data is known
    for where in ("optimizer", "scheduler"):
        for key, value in ((ds.get(where) or {}).get("params") or {}).items():
            if value == "auto" and not (where == "scheduler" and key in auto_steps):
                raise ConfigError(f"{path}: {where}.params.{key} is \"auto\" but this pipeline cannot derive it; give a value")
    return ds


def fill_schedule(path: str, ds: dict, total_steps: int, warmup_ratio: float) -> dict:
    """Fill a scheduler's "auto" step counts from the run's real length."""
    ds = copy.deepcopy(ds)
    params = (ds.get("scheduler") or {}).get("params") or {}
    if params.get("total_num_steps") == "auto":
        params["total_num_steps"] = total_steps
    if params.get("warmup_num_steps") == "auto":
        params["warmup_num_steps"] = math.ceil(warmup_ratio * total_steps)
    if isinstance(params.get("total_num_steps"), int) and params["total_num_steps"] < total_steps:
        raise ConfigError(f"{path}: scheduler.params.total_num_steps={params['total_num_steps']} is shorter than the run "
                          f"({total_steps} optimizer steps); use \"auto\"")
    return ds


def ds_precision(ds: dict) -> str:
    return "fp16" if ds["fp16"]["enabled"] else "bf16" if ds["bf16"]["enabled"] else "fp32"
