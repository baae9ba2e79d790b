"""Keys and types of a DeepSpeed JSON, checked at every level before any rank starts.

DeepSpeed validates most sections with pydantic models (`extra="forbid"`), but only inside
`deepspeed.initialize`, after the process group, data preparation and model loading; other
sections (optimizer, scheduler, activation checkpointing) it reads with `.get()` and ignores
typos. Here the same pydantic models check their sections up front, and DeepSpeed's own key
constants stand in where it has no model, so the known keys follow the installed DeepSpeed.
"""

from __future__ import annotations

import typing

from .base import unknown_key_message as _unknown

# Top-level keys DeepSpeed 0.19 reads (deepspeed/runtime/config.py and its sub-configs), plus
# `pipeline_resolved`, the record this pipeline adds to the config it resolves.
TOP_LEVEL_KEYS = {
    "train_batch_size",
    "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps",
    "optimizer",
    "scheduler",
    "fp16",
    "bf16",
    "bfloat16",
    "amp",
    "torch_autocast",
    "gradient_clipping",
    "zero_optimization",
    "zero_allow_untested_optimizer",
    "zero_force_ds_cpu_optimizer",
    "communication_data_type",
    "seq_parallel_communication_data_type",
    "prescale_gradients",
    "gradient_predivide_factor",
    "gradient_allreduce_op",
    "sparse_gradients",
    "steps_per_print",
    "wall_clock_breakdown",
    "memory_breakdown",
    "dump_state",
    "log_level",
    "disable_allgather",
    "dataloader_drop_last",
    "activation_checkpointing",
    "flops_profiler",
    "tensorboard",
    "wandb",
    "csv_monitor",
    "comet",
    "monitor_config",
    "comms_logger",
    "comms_config",
    "autotuning",
    "elasticity",
    "data_efficiency",
    "curriculum_learning",
    "compression_training",
    "sparse_attention",
    "eigenvalue",
    "progressive_layer_drop",
    "pipeline",
    "checkpoint",
    "data_types",
    "aio",
    "nebula",
    "quantize_training",
    "weight_quantization",
    "hybrid_engine",
    "compile",
    "timers",
    "tensor_parallel",
    "expert_parallel",
    "use_data_before_expert_parallelism",
    "graph_harvesting",
    "disable_python_gc",
    "managed_gradient_accumulation",
    "vocabulary_size",
    "zenflow",
    "sequence_parallel_size",
    "mics_shard_size",
    "mics_hierarchical_params_gather",
    "pipeline_resolved",
}

# Top-level scalars and the JSON types DeepSpeed accepts for them ("auto" is allowed where the
# pipeline fills it: the batch triple and gradient_clipping).
_NUMBER, _INT, _BOOL = (int, float), (int,), (bool,)
SCALAR_TYPES = {
    "train_batch_size": _INT,
    "train_micro_batch_size_per_gpu": _INT,
    "gradient_accumulation_steps": _INT,
    "gradient_clipping": _NUMBER,
    "steps_per_print": _INT,
    "gradient_predivide_factor": _NUMBER,
    "wall_clock_breakdown": _BOOL,
    "memory_breakdown": _BOOL,
    "prescale_gradients": _BOOL,
    "sparse_gradients": _BOOL,
    "dump_state": _BOOL,
    "zero_allow_untested_optimizer": _BOOL,
    "zero_force_ds_cpu_optimizer": _BOOL,
    "disable_allgather": _BOOL,
    "dataloader_drop_last": _BOOL,
}
AUTO_OK = {"train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping"}


def _pydantic_sections() -> dict:
    """Section name -> DeepSpeed's pydantic model for it (imported lazily: deepspeed loads torch)."""
    from deepspeed.comm.config import CommsLoggerConfig
    from deepspeed.compile.config import CompileConfig
    from deepspeed.monitor.config import CometConfig, CSVConfig, TensorBoardConfig, WandbConfig
    from deepspeed.runtime.config import HybridEngineConfig
    from deepspeed.runtime.precision_config import DeepSpeedBF16Config, DeepSpeedFP16Config
    from deepspeed.runtime.tensor_parallel.config import TPTrainingConfig
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    return {
        "zero_optimization": DeepSpeedZeroConfig,
        "fp16": DeepSpeedFP16Config,
        "bf16": DeepSpeedBF16Config,
        "bfloat16": DeepSpeedBF16Config,
        "tensorboard": TensorBoardConfig,
        "wandb": WandbConfig,
        "csv_monitor": CSVConfig,
        "comet": CometConfig,
        "comms_logger": CommsLoggerConfig,
        "compile": CompileConfig,
        "hybrid_engine": HybridEngineConfig,
        "tensor_parallel": TPTrainingConfig,
    }


def _constant_sections() -> dict:
    """Sections DeepSpeed reads key by key: the keys come from its constants modules."""
    from deepspeed.profiling import constants as profiling
    from deepspeed.runtime import constants as runtime
    from deepspeed.runtime.activation_checkpointing import config as act

    def values(module, prefix: str) -> set:
        return {
            v
            for k, v in vars(module).items()
            if k.startswith(prefix) and not k.endswith("_DEFAULT") and isinstance(v, str) and k != prefix
        }

    return {
        "activation_checkpointing": values(act, "ACT_CHKPT_"),
        "flops_profiler": values(profiling, "FLOPS_PROFILER_"),
        # optimizer/scheduler params depend on the type and are passed through as they are
        "optimizer": {runtime.TYPE, runtime.OPTIMIZER_PARAMS, runtime.LEGACY_FUSION},
        "scheduler": {runtime.TYPE, runtime.SCHEDULER_PARAMS},
    }


def _model_keys(model) -> set:
    return {name for name, f in model.model_fields.items()} | {f.alias for f in model.model_fields.values() if f.alias}


def _field(model, key: str):
    for name, f in model.model_fields.items():
        if key in (name, f.alias):
            return f
    return None


def _submodel(annotation):
    """The pydantic model inside `Optional[Model]` / `Model`, or None."""
    for candidate in (annotation, *typing.get_args(annotation)):
        if isinstance(candidate, type) and hasattr(candidate, "model_fields"):
            return candidate
    return None


def _check_model(where: str, section: dict, model, errors: list, warnings: list) -> None:
    """Unknown keys (with a suggestion) and deprecated keys at every level of `section`, then
    DeepSpeed's own type validation of the whole section."""
    from deepspeed.utils import logger
    from pydantic import ValidationError

    before = len(errors)
    for key, value in section.items():
        f = _field(model, key)
        if f is None:
            errors.append(_unknown(where, key, _model_keys(model)))
            continue
        extra = f.json_schema_extra if isinstance(f.json_schema_extra, dict) else {}
        if extra.get("deprecated"):
            warnings.append(f"{where}.{key} is deprecated" + (f"; use {extra['new_param']}" if extra.get("new_param") else ""))
        sub = _submodel(f.annotation)
        if sub is not None and isinstance(value, dict):
            _check_model(f"{where}.{key}", value, sub, errors, warnings)
    if len(errors) > before:
        return  # pydantic would only repeat them as "extra inputs are not permitted"
    level = logger.level
    logger.setLevel("ERROR")  # its deprecation warnings are reported above, in our words
    try:
        model(**section)
    except ValidationError as e:
        for err in e.errors():
            loc = ".".join(str(p) for p in err["loc"])
            errors.append(f"{where}.{loc} = {err.get('input')!r}: {err['msg']}")
    except (ValueError, AssertionError) as e:  # DeepSpeed's own cross-field checks
        errors.append(f"{where}: {e}")
    finally:
        logger.setLevel(level)


def validate(path: str, ds: dict) -> tuple[list[str], list[str]]:
    """(errors, warnings) about keys and types anywhere in the DeepSpeed config `ds` from `path`."""
    errors, warnings = [], []
    pydantic_sections, constant_sections = _pydantic_sections(), _constant_sections()
    for key, value in ds.items():
        where = f"{path}: {key}"
        if key not in TOP_LEVEL_KEYS:
            errors.append(_unknown(path, key, TOP_LEVEL_KEYS))
        elif key in SCALAR_TYPES:
            ok = (value == "auto" and key in AUTO_OK) or (
                isinstance(value, SCALAR_TYPES[key]) and (bool in SCALAR_TYPES[key] or not isinstance(value, bool))
            )
            if not ok:
                expected = {_NUMBER: "a number", _INT: "an integer", _BOOL: "true or false"}[SCALAR_TYPES[key]]
                errors.append(f"{where} = {value!r}, expected {expected}" + (' or "auto"' if key in AUTO_OK else ""))
        elif key in pydantic_sections or key in constant_sections:
            if not isinstance(value, dict):
                errors.append(f"{where} = {value!r}, expected a JSON object")
            elif key in pydantic_sections:
                _check_model(f"{path}: {key}", value, pydantic_sections[key], errors, warnings)
            else:
                errors.extend(_unknown(where, k, constant_sections[key]) for k in value if k not in constant_sections[key])
    return errors, warnings
