"""The DeepSpeed JSON, resolved once for a world size, the hardware and the run.

`resolve_ds_config` returns the dict as the engine will use it: the batch triple checked against
the real world size ("auto" values filled the way HF Trainer fills them), the precision the
hardware can run, stage settings that would be silently ignored refused, learning rates scaled on
request. It runs once, before any process group exists (and in `./launch.sh`, `check-config`,
`plan`), so a bad config fails fast with the file and key named. Once the data is read and the run
directory chosen, `ResolvedConfig.for_run` adds only what depends on them: the schedule's length,
the profiler and a resumed run's global batch.
"""

from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass
from pathlib import Path

from .base import ConfigError
from .model_dir import has_weights
from .options import TrainConfig

BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
MAX_AUTO_MICRO = 8  # HF Trainer's default per_device_train_batch_size: the cap where micro and accumulation are both "auto"
# Absolute learning rates in optimizer.params and scheduler.params (WarmupLR, WarmupDecayLR, OneCycle,
# LRRangeTest). Scaling all of them keeps the schedule's shape; WarmupCosineLR's ratios follow the lr.
LR_KEYS = ("lr", "warmup_min_lr", "warmup_max_lr", "cycle_min_lr", "cycle_max_lr", "lr_range_test_min_lr")
# Where the JSON says "auto" (or leaves the key out) and no flag is given: HF Trainer's defaults,
# except weight decay and warmup, BERT's fine-tuning values (Devlin et al. 2019), and the learning
# rate of a model trained from its config alone (default_learning_rate).
HYPERPARAMETER_DEFAULTS = {
    "weight_decay": 0.01,
    "adam_beta1": 0.9,
    "adam_beta2": 0.999,
    "adam_epsilon": 1e-8,
    "max_grad_norm": 1.0,
    "warmup_ratio": 0.1,
    "lr_scheduler_type": "linear",
}
# --lr-scheduler-type -> the DeepSpeed scheduler with the same shape, used where the JSON has none
# (as HF Trainer uses its own scheduler then). DeepSpeed's warmup is logarithmic unless told.
SCHEDULERS = {
    "linear": {
        "type": "WarmupDecayLR",
        "params": {"warmup_min_lr": 0, "warmup_max_lr": "auto", "warmup_num_steps": "auto", "total_num_steps": "auto"},
    },
    "cosine": {
        "type": "WarmupCosineLR",
        "params": {"warmup_min_ratio": 0.0, "cos_min_ratio": 0.0, "warmup_num_steps": "auto", "total_num_steps": "auto"},
    },
    "constant_with_warmup": {
        "type": "WarmupLR",
        "params": {"warmup_min_lr": 0, "warmup_max_lr": "auto", "warmup_num_steps": "auto"},
    },
    "constant": None,  # no scheduler: DeepSpeed keeps the optimizer's learning rate
}
WARMUP_SCHEDULERS = ("WarmupLR", "WarmupDecayLR", "WarmupCosineLR")
# Compute capability of GPUs people name on the command line (bf16 needs 8.0+).
GPU_CAPABILITY = {"v100": 7.0, "t4": 7.5, "a100": 8.0, "a10": 8.6, "a40": 8.6, "l4": 8.9, "h100": 9.0, "h200": 9.0}


def native_bf16() -> bool:
    """Whether the current GPU computes bf16 natively (compute capability 8.0+).

    torch.cuda.is_bf16_supported() also counts emulation (its default including_emulation=True,
    which DeepSpeed's CUDA accelerator uses): True on a V100, where bf16 is slower and less precise
    than fp16 and SDPA falls back to its math kernel, storing whole attention matrices."""
    import torch

    return torch.cuda.is_bf16_supported(including_emulation=False)


@dataclass(frozen=True)
class Hardware:
    """What precision the accelerator can run: DeepSpeed's CPU accelerator has no fp16."""

    device: str  # "cpu" or "cuda"
    fp16: bool
    bf16: bool
    name: str = ""

    @classmethod
    def detect(cls) -> Hardware:
        import torch

        if os.environ.get("DS_ACCELERATOR", "") != "cpu" and torch.cuda.is_available():
            return cls("cuda", fp16=True, bf16=native_bf16(), name=torch.cuda.get_device_name(0))
        return cls("cpu", fp16=False, bf16=True, name="CPU (DeepSpeed CPU accelerator, gloo)")

    @classmethod
    def named(cls, name: str) -> Hardware:
        """The hardware of a cluster this machine is not: "cpu" or a GPU of GPU_CAPABILITY."""
        if name.lower() == "cpu":
            return cls("cpu", fp16=False, bf16=True, name="CPU (DeepSpeed CPU accelerator, gloo)")
        if name.lower() not in GPU_CAPABILITY:
            raise ConfigError(f"--gpu {name}: unknown GPU; expected cpu or one of {', '.join(GPU_CAPABILITY)}")
        capability = GPU_CAPABILITY[name.lower()]
        return cls("cuda", fp16=True, bf16=capability >= 8.0, name=f"{name.upper()} (compute capability {capability})")


@dataclass
class ResolvedConfig:
    """The DeepSpeed config as the engine will use it, what was derived, and what may hurt; after
    `for_run` also the run's length."""

    path: str
    ds: dict
    notes: list[str]
    warnings: list[str]
    steps_per_epoch: int = 0
    total_steps: int = 0

    def for_run(self, cfg: TrainConfig, world_size: int, run: RunShape) -> ResolvedConfig:
        """This config completed for the run: a resumed run's global batch, the schedule's length, the
        profiler. Its `warnings` are only what this step adds (the first step's were shown already)."""
        ds, warnings = copy.deepcopy(self.ds), []
        total = ds["train_batch_size"]
        if run.resumed_from:
            total, micro, accum = _keep_global_batch(
                run, total, ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], world_size
            )
            ds.update(train_batch_size=total, train_micro_batch_size_per_gpu=micro, gradient_accumulation_steps=accum)
        per_epoch = steps_per_epoch(run.num_records, total)
        if per_epoch == 0:
            raise ConfigError(
                f"{cfg.train_file}: {run.num_records} records, fewer than one global batch (train_batch_size={total})"
            )
        total_steps = min(per_epoch * cfg.epochs, cfg.max_steps or per_epoch * cfg.epochs)
        ds = fill_schedule(self.path, ds, total_steps, warmup_steps(cfg, total_steps))
        if cfg.flops_profiler_step:
            ds["flops_profiler"] = {
                "enabled": True,
                "profile_step": cfg.flops_profiler_step,
                "output_file": str(Path(run.run_dir) / "flops_profile.txt"),
            }
        if run.resumed_from and run.resumed_world_size != world_size:  # DeepSpeed re-partitions from its universal format
            ds["checkpoint"] = {**ds.get("checkpoint", {}), "load_universal": True}
            warnings.append(
                f"resuming a {run.resumed_world_size}-rank checkpoint on {world_size} ranks: global batch kept at "
                f"{total} = {ds['train_micro_batch_size_per_gpu']} x {ds['gradient_accumulation_steps']} accumulation "
                f"x {world_size}; not carried over: each rank's RNG state (dropout masks differ from an "
                "uninterrupted run) and bit-exactness (reductions run in another order)"
            )
        return ResolvedConfig(self.path, ds, [], warnings, per_epoch, total_steps)


@dataclass(frozen=True)
class RunShape:
    """What the last values of the DeepSpeed config depend on, known once the data is read and the
    run directory (and any checkpoint to resume) is chosen."""

    num_records: int  # training records
    run_dir: str
    resumed_from: str = ""  # the checkpoint, when resuming
    resumed_world_size: int = 0
    resumed_batch: int = 0  # the checkpoint's global batch, which the data position counts in


def steps_per_epoch(num_samples: int, global_batch: int) -> int:
    """Optimizer steps in an epoch: the last incomplete global batch is dropped (see data.py)."""
    return num_samples // global_batch


def _is_auto(value) -> bool:
    return value is None or value == "auto"


def _positive_int(path: str, key: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{path}: '{key}' = {value!r}, expected a positive integer or \"auto\"")
    return value


def _indivisible(path: str, total: int, name: str | None, fixed: int, world: int, shown: str) -> ConfigError:
    """train_batch_size not divisible by `fixed` (the value of `name`) x world size, with the nearest
    valid batch sizes and, where the batch divides by the world size, other values for `name`."""
    unit = fixed * world
    factor = f"{name} ({fixed}) x world size ({world})" if name else f"world size ({world})"
    choices = [t for t in (total // unit * unit, (total // unit + 1) * unit) if t > 0]
    options = " or ".join(f"train_batch_size {t}" + (f" ({t // unit} x {fixed} x {world})" if name else "") for t in choices)
    if name and total % world == 0:
        per_rank = total // world
        others = sorted(sorted((d for d in range(1, per_rank + 1) if per_rank % d == 0), key=lambda d: abs(d - fixed))[:3])
        options += f", or keep {total} with {name} " + " or ".join(map(str, others))
    return ConfigError(f"{path}: train_batch_size {total} is not divisible by {factor} ({shown}); nearest valid: {options}")


def _from_option(path: str, json_value, key: str, option: int, flag: str):
    """HF Trainer's rule: an "auto" value is filled from the run's option; a number must agree with it."""
    if not option:
        return json_value
    if json_value is not None and json_value != option:
        raise ConfigError(f'{path}: {key}={json_value} contradicts {flag} {option}; set it to "auto" in the JSON or drop {flag}')
    return option


def resolve_batch(
    path: str, ds: dict, world_size: int, global_batch: int = 0, micro_batch: int = 0, accumulation: int = 0
) -> tuple[int, int, int]:
    """Resolve (train_batch_size, micro_batch_per_gpu, accumulation) against the real world size.

    Two of the three determine the third (as DeepSpeed does); all three must agree. `global_batch`
    `micro_batch` and `accumulation` (0: unset) fill "auto" values. With only the global batch known, the micro
    batch is the largest divisor of the per-rank batch up to MAX_AUTO_MICRO.
    """
    given = {k: _positive_int(path, k, ds[k]) for k in BATCH_KEYS if not _is_auto(ds.get(k))}
    total, micro, accum = (given.get(k) for k in BATCH_KEYS)
    shown = ", ".join(f"{k}={ds.get(k, 'missing')}" for k in BATCH_KEYS) + f", world size={world_size}"
    total = _from_option(path, total, "train_batch_size", global_batch, "--global-batch")
    micro = _from_option(path, micro, "train_micro_batch_size_per_gpu", micro_batch, "--micro-batch")
    accum = _from_option(path, accum, "gradient_accumulation_steps", accumulation, "--gradient-accumulation-steps")
    if total is None and micro is not None:
        total = micro * (accum or 1) * world_size
    if micro is None and total is not None:
        if accum is None:
            if total % world_size:
                raise _indivisible(path, total, None, 1, world_size, shown)
            per_rank = total // world_size
            micro = max(d for d in range(1, min(MAX_AUTO_MICRO, per_rank) + 1) if per_rank % d == 0)
        elif total % (accum * world_size):
            raise _indivisible(path, total, "gradient_accumulation_steps", accum, world_size, shown)
        else:
            micro = total // (accum * world_size)
    if micro is None:
        raise ConfigError(
            f"{path}: set train_micro_batch_size_per_gpu or train_batch_size, in the JSON or with "
            f"--micro-batch / --global-batch ({shown})"
        )
    if accum is None:
        if total % (micro * world_size):
            raise _indivisible(path, total, "train_micro_batch_size_per_gpu", micro, world_size, shown)
        accum = total // (micro * world_size)
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
        choice = (
            "fp32" if hw.device == "cpu" else ("bf16" if hw.bf16 and bf16 == "auto" else "fp16" if fp16 == "auto" else "fp32")
        )
    else:
        choice = "fp32"
    if choice == "fp16" and not hw.fp16:
        raise ConfigError(
            f"{path}: fp16 requested but {hw.name} cannot run it (DeepSpeed's CPU accelerator has no fp16); use --precision bf16 or fp32 there"
        )
    if choice == "bf16" and not hw.bf16:
        raise ConfigError(f"{path}: bf16 requested but {hw.name} has no bf16 (needs compute capability 8.0+); use fp16")
    return choice


def _offload_device(zero: dict, key: str) -> str:
    section = zero.get(key)
    return section.get("device", "none") if isinstance(section, dict) else "none"


def check_stage_settings(path: str, ds: dict) -> list[str]:
    """Settings that the chosen ZeRO stage silently ignores: offload is an error (the user expects
    the memory saving and would not get it), stage3_* tuning a warning. Returns the warnings."""
    zero = ds.get("zero_optimization") or {}
    stage = zero.get("stage", 0)
    if _offload_device(zero, "offload_param") != "none" and stage != 3:
        raise ConfigError(
            f"{path}: zero_optimization.offload_param only works at stage 3, and stage {stage} ignores it; "
            "use stage 3 or remove it"
        )
    if (_offload_device(zero, "offload_optimizer") != "none" or zero.get("cpu_offload") is True) and stage == 0:
        raise ConfigError(f"{path}: optimizer offload needs ZeRO stage 1, 2 or 3; stage 0 ignores it")
    warnings = [
        f"{path}: zero_optimization.{key} is ignored at stage {stage} (a stage-3 setting)"
        for key in zero
        if key.startswith("stage3_") and stage != 3
    ]
    fp16 = ds.get("fp16") or {}
    power = fp16.get("initial_scale_power", 16)
    if _enabled(fp16) and fp16.get("loss_scale", 0) == 0 and isinstance(power, int) and power > 16:
        warnings.append(
            f"{path}: fp16.initial_scale_power={power} starts the loss scale at 2^{power}; each overflow skips "
            f"an optimizer step and halves it, so a short fine-tune loses about {power - 16} or more of its first "
            "steps before reaching DeepSpeed's default 2^16; use 16"
        )
    return warnings


def _check_pipeline_rules(path: str, ds: dict) -> None:
    """What this pipeline needs beyond DeepSpeed: a sharded stage to export from, a named optimizer,
    and no "auto" left that no flag fills (fill_hyperparameters has filled the rest)."""
    zero = ds.get("zero_optimization") or {}
    if zero.get("stage", 0) not in (1, 2, 3):
        raise ConfigError(
            f"{path}: zero_optimization.stage must be 1, 2 or 3 (got {zero.get('stage')!r}); this pipeline exports from ZeRO shards"
        )
    if not isinstance(ds.get("optimizer"), dict) or "type" not in ds["optimizer"]:
        raise ConfigError(f"{path}: 'optimizer' with a 'type' (e.g. AdamW) is required")
    auto_steps = ("total_num_steps", "warmup_num_steps")  # filled by fill_schedule once the data is known
    for where in ("optimizer", "scheduler"):
        for key, value in ((ds.get(where) or {}).get("params") or {}).items():
            if value == "auto" and not (where == "scheduler" and key in auto_steps):
                raise ConfigError(f'{path}: {where}.params.{key} is "auto" but this pipeline cannot derive it; give a value')


def default_learning_rate(model_dir: str) -> tuple[float, str]:
    """HF's 5e-5 for fine-tuning pretrained weights; a model initialised from its config alone (the
    bundled tiny one) trains from scratch, where 5e-5 would barely move it in a short run."""
    if has_weights(model_dir):
        return 5e-5, "default for a model with pretrained weights"
    return 1e-3, "default for a model initialised from its config alone"


def warmup_steps(cfg: TrainConfig, total_steps: int) -> int:
    """--warmup-steps, else --warmup-ratio (or its default) of the run's steps, as HF Trainer counts them."""
    if cfg.warmup_steps is not None:
        return cfg.warmup_steps
    ratio = HYPERPARAMETER_DEFAULTS["warmup_ratio"] if cfg.warmup_ratio is None else cfg.warmup_ratio
    return math.ceil(ratio * total_steps)


def _fill(path: str, section: dict, where: str, key: str, value, given, flag: str):
    """HF Trainer's rule: an "auto" (or absent) value takes the flag's value or its default; a number
    in the JSON that a given flag contradicts is refused, naming both."""
    if _is_auto(section.get(key)):
        section[key] = value
    elif given is not None and section[key] != given:
        name = f"{where}.{key}" if where else key
        raise ConfigError(
            f'{path}: {name}={section[key]!r} contradicts {flag} {given!r}; set it to "auto" in the JSON or drop {flag}'
        )
    return section[key]


def fill_hyperparameters(path: str, ds: dict, cfg: TrainConfig) -> str:
    """Fill the optimizer, scheduler and clipping values the JSON leaves "auto" from the Hugging Face
    flags (--learning-rate, ...), as HF Trainer's DeepSpeed integration does; returns one line with
    every value the engine will use."""
    value = {
        key: HYPERPARAMETER_DEFAULTS[key] if getattr(cfg, key) is None else getattr(cfg, key) for key in HYPERPARAMETER_DEFAULTS
    }
    lr, optimizer = _fill_optimizer(path, ds, cfg, value)
    _fill(path, ds, "", "gradient_clipping", value["max_grad_norm"], cfg.max_grad_norm, "--max-grad-norm")
    return f"{optimizer}; {_fill_scheduler(path, ds, cfg, lr, value)}; gradient_clipping {ds['gradient_clipping']}"


def _fill_optimizer(path: str, ds: dict, cfg: TrainConfig, value: dict) -> tuple[float, str]:
    """The optimizer's learning rate, weight decay and Adam's betas and epsilon; a JSON without an
    optimizer gets AdamW, as HF Trainer does. Returns the learning rate and a line saying it all."""
    lr, why = (cfg.learning_rate, "--learning-rate") if cfg.learning_rate is not None else default_learning_rate(cfg.model)
    optimizer = ds.setdefault("optimizer", {"type": "AdamW"})
    params = optimizer.setdefault("params", {})
    if not _is_auto(params.get("lr")):
        why = "the JSON's"
    lr = _fill(path, params, "optimizer.params", "lr", lr, cfg.learning_rate, "--learning-rate")
    _fill(path, params, "optimizer.params", "weight_decay", value["weight_decay"], cfg.weight_decay, "--weight-decay")
    if "adam" in str(optimizer.get("type", "")).lower() or "lamb" in str(optimizer.get("type", "")).lower():
        if _is_auto(params.get("betas")):
            params["betas"] = [value["adam_beta1"], value["adam_beta2"]]
        for i, key in enumerate(("adam_beta1", "adam_beta2")):
            if getattr(cfg, key) is not None and params["betas"][i] != getattr(cfg, key):
                raise ConfigError(
                    f"{path}: optimizer.params.betas={params['betas']} contradicts --{key.replace('_', '-')} "
                    f'{getattr(cfg, key)}; set betas to "auto" in the JSON or drop the flag'
                )
        _fill(path, params, "optimizer.params", "eps", value["adam_epsilon"], cfg.adam_epsilon, "--adam-epsilon")
    shown = "".join(f", {key} {params[key]}" for key in ("betas", "eps", "weight_decay") if key in params)
    return lr, f"optimizer: {optimizer.get('type')} lr {lr:g} ({why}){shown}"


def _fill_scheduler(path: str, ds: dict, cfg: TrainConfig, lr: float, value: dict) -> str:
    """The --lr-scheduler-type's DeepSpeed scheduler where the JSON has none; warmup and peak
    filled; a JSON scheduler whose peak would override the optimizer's learning rate refused."""
    origin = f"--lr-scheduler-type {cfg.lr_scheduler_type}" if cfg.lr_scheduler_type else "HF's default, linear"
    if "scheduler" not in ds:
        if SCHEDULERS[value["lr_scheduler_type"]] is None:
            return f"no scheduler ({origin})"
        ds["scheduler"] = copy.deepcopy(SCHEDULERS[value["lr_scheduler_type"]])
        ds["scheduler"]["params"]["warmup_type"] = "linear"
    else:
        origin = "the JSON's"
        wanted = cfg.lr_scheduler_type and (SCHEDULERS[cfg.lr_scheduler_type] or {"type": "none"})["type"]
        if wanted and ds["scheduler"].get("type") != wanted:
            raise ConfigError(
                f"{path}: scheduler.type={ds['scheduler'].get('type')!r} contradicts --lr-scheduler-type "
                f"{cfg.lr_scheduler_type} (DeepSpeed's {wanted}); remove the JSON's scheduler section to choose it by flag"
            )
    schedule = ds["scheduler"].setdefault("params", {})
    if ds["scheduler"].get("type") in WARMUP_SCHEDULERS:  # DeepSpeed's default, 1000 steps, outlasts a short fine-tune
        schedule.setdefault("warmup_num_steps", "auto")
    if not _is_auto(schedule.get("warmup_num_steps", "auto")) and (cfg.warmup_steps is not None or cfg.warmup_ratio is not None):
        flag = f"--warmup-steps {cfg.warmup_steps}" if cfg.warmup_steps is not None else f"--warmup-ratio {cfg.warmup_ratio}"
        raise ConfigError(
            f"{path}: scheduler.params.warmup_num_steps={schedule['warmup_num_steps']} contradicts {flag}; "
            'set it to "auto" in the JSON or drop the flag'
        )
    if ds["scheduler"].get("type") in ("WarmupLR", "WarmupDecayLR"):
        if schedule.get("warmup_min_lr") == "auto":
            schedule["warmup_min_lr"] = 0
        peak = _fill(path, schedule, "scheduler.params", "warmup_max_lr", lr, cfg.learning_rate, "--learning-rate")
        if peak != lr:  # the scheduler sets the learning rate itself: optimizer.params.lr is never used
            raise ConfigError(
                f"{path}: scheduler.params.warmup_max_lr={peak} overrides optimizer.params.lr={lr} "
                f"({ds['scheduler']['type']} sets the learning rate itself, so the peak would be {peak}); "
                'make them equal, or set warmup_max_lr to "auto"'
            )
    warmup = (
        f"{cfg.warmup_steps} warmup steps" if cfg.warmup_steps is not None else f"warmup {value['warmup_ratio']:g} of the steps"
    )
    return f"scheduler: {ds['scheduler'].get('type')} ({origin}), {warmup}"


def scale_learning_rates(path: str, ds: dict, rule: str, reference_batch: int) -> str | None:
    """Scale every absolute learning rate by the global batch relative to `reference_batch`
    (linear: Goyal et al. 2017; sqrt: for Adam-type optimizers), once: the factor is recorded in
    ds["pipeline_resolved"], and a config that already carries one is refused."""
    if rule == "none":
        return None
    record = ds.setdefault("pipeline_resolved", {})
    if "lr_scaling" in record:
        raise ConfigError(
            f"{path}: learning rates were already scaled (x{record['lr_scaling']['factor']:.4g}) when this config "
            "was resolved; start from the original JSON or use --lr-scaling none"
        )
    ratio = ds["train_batch_size"] / reference_batch
    factor = ratio if rule == "linear" else math.sqrt(ratio)
    scaled = {}
    for where in ("optimizer", "scheduler"):
        params = (ds.get(where) or {}).get("params") or {}
        for key in LR_KEYS:
            if isinstance(params.get(key), (int, float)) and not isinstance(params[key], bool):
                scaled[f"{where}.params.{key}"] = [params[key], params[key] * factor]
                params[key] *= factor
    if not scaled:
        raise ConfigError(f"{path}: --lr-scaling {rule} but the JSON gives no learning rate to scale (optimizer.params.lr)")
    record["lr_scaling"] = {
        "rule": rule,
        "reference_batch": reference_batch,
        "global_batch": ds["train_batch_size"],
        "factor": factor,
        "scaled": scaled,
    }
    changes = ", ".join(f"{k} {a:g} -> {b:g}" for k, (a, b) in scaled.items())
    return f"learning rate scaled {rule} for global batch {ds['train_batch_size']} vs reference {reference_batch} (x{factor:.4g}): {changes}"


def resolve_ds_config(
    path: str,
    raw: dict,
    world_size: int,
    hw: Hardware,
    cfg: TrainConfig,
    pipeline_rules: bool = True,
) -> ResolvedConfig:
    """Return the DeepSpeed config as the engine will use it ("auto" values filled in), with notes on
    what was derived and warnings: the one place the dict is edited (and `for_run`, for what the
    data decides). Keys and types are checked at every level first, and every such error is
    reported at once. `pipeline_rules=False` checks only what DeepSpeed needs (for configs meant
    for other trainers)."""
    from .ds_schema import validate

    errors, warnings = validate(path, raw)
    if errors:
        raise ConfigError("\n".join(errors))
    ds = copy.deepcopy(raw)
    notes = []
    total, micro, accum = resolve_batch(path, ds, world_size, cfg.global_batch, cfg.micro_batch, cfg.gradient_accumulation_steps)
    derived = [k for k in BATCH_KEYS if _is_auto(raw.get(k))]
    notes.append(
        f"batch: {micro} per rank x {accum} accumulation x {world_size} ranks = {total} per optimizer step"
        + (f" (derived: {', '.join(derived)})" if derived else "")
    )
    ds.update(train_batch_size=total, train_micro_batch_size_per_gpu=micro, gradient_accumulation_steps=accum)
    notes.append(fill_hyperparameters(path, ds, cfg))
    if pipeline_rules:
        _check_pipeline_rules(path, ds)
    warnings += check_stage_settings(path, ds)

    choice = resolve_precision(path, ds, cfg.precision, hw)
    ds.pop("bfloat16", None)
    ds["fp16"] = {**(ds.get("fp16") or {}), "enabled": choice == "fp16"}
    ds["bf16"] = {**(ds.get("bf16") or raw.get("bfloat16") or {}), "enabled": choice == "bf16"}
    notes.append(f"precision: {choice}")
    lr_note = scale_learning_rates(path, ds, cfg.lr_scaling, cfg.reference_batch)
    if lr_note:
        notes.append(lr_note)
    return ResolvedConfig(path, ds, notes, warnings)


def _keep_global_batch(run: RunShape, total: int, micro: int, accum: int, world_size: int) -> tuple[int, int, int]:
    """Resuming: the global batch must stay what the checkpoint trained with, since the position in
    the epoch's data order counts global batches. On another world size the accumulation steps are
    re-derived to keep it (with this config's micro batch)."""
    if run.resumed_world_size == world_size:
        if run.resumed_batch != total:
            raise ConfigError(
                f"{run.resumed_from}: trained with a global batch of {run.resumed_batch}, but this config gives "
                f"{total}; resume with the checkpoint's batch settings"
            )
        return total, micro, accum
    return resolve_batch(
        run.resumed_from, {"train_batch_size": run.resumed_batch, "train_micro_batch_size_per_gpu": micro}, world_size
    )


def fill_schedule(path: str, ds: dict, total_steps: int, warmup: int) -> dict:
    """Fill a scheduler's "auto" step counts from the run's real length."""
    ds = copy.deepcopy(ds)
    params = (ds.get("scheduler") or {}).get("params") or {}
    if params.get("total_num_steps") == "auto":
        params["total_num_steps"] = total_steps
    if params.get("warmup_num_steps") == "auto":
        params["warmup_num_steps"] = warmup
    if isinstance(params.get("total_num_steps"), int) and params["total_num_steps"] < total_steps:
        raise ConfigError(
            f"{path}: scheduler.params.total_num_steps={params['total_num_steps']} is shorter than the run "
            f'({total_steps} optimizer steps); use "auto"'
        )
    return ds


def ds_precision(ds: dict) -> str:
    return "fp16" if ds["fp16"]["enabled"] else "bf16" if ds["bf16"]["enabled"] else "fp32"


def ops_to_build(ds: dict) -> list[str]:
    """The DeepSpeed ops this config's optimizer JIT-builds in `deepspeed.initialize`, unless prebuilt
    (runtime/engine.py `_configure_basic_optimizer`: Adam/AdamW is FusedAdam without offload,
    DeepSpeedCPUAdam with it; `torch_adam` uses torch's own; ops/adam/fused_adam.py loads its op in
    the constructor). CPU ranks build a C++ `fused_adam` of the same name (op_builder/cpu/fused_adam.py)."""
    optimizer = ds.get("optimizer") or {}
    name = str(optimizer.get("type", "")).lower()
    offload = ((ds.get("zero_optimization") or {}).get("offload_optimizer") or {}).get("device") in ("cpu", "nvme")
    if name in ("adam", "adamw") and not (optimizer.get("params") or {}).get("torch_adam"):
        return ["cpu_adam" if offload else "fused_adam"]
    if name in ("lion", "adagrad") and offload:
        return [f"cpu_{name}"]
    if name in ("lion", "lamb"):
        return [f"fused_{name}"]
    return []
