"""The model and its engine: the classifier built (partitioned under ZeRO-3), and the runtime's one
call of `deepspeed.initialize` (the benchmark's hand-written baseline makes its own).

Optimizer, scheduler, precision, clipping and ZeRO come from the resolved DeepSpeed config; the
engine owns gradient accumulation (it scales each micro-batch loss by 1/accumulation in
`backward` and applies the update at the window's boundary in `step`).
"""

from __future__ import annotations

import contextlib

from ..core.base import ConfigError
from ..core.dist import build_note, is_main
from ..core.ds_config import ops_to_build
from ..core.model_dir import has_weights
from ..tasks.base import Task
from ..tasks.single_label import SINGLE_LABEL


def build_engine(model, ds_config: dict):
    import deepspeed

    note = build_note(ops_to_build(ds_config)) if is_main() else None
    if note:  # the optimizer's op, built in `initialize` on GPUs and CPU ranks alike
        print(note, flush=True)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=[p for p in model.parameters() if p.requires_grad],
        config=ds_config,
    )
    return engine


def build_model(
    model_dir: str,
    label_names: list[str],
    vocab_size: int,
    ds_config: dict,
    seed: int,
    gradient_checkpointing: bool = False,
    task: Task = SINGLE_LABEL,
    output_bias: list[float] | None = None,
):
    """The task's model (its class, label space and problem_type), partitioned while it is built under
    ZeRO-3, optionally recomputing activations; `output_bias` (the task's initial_bias) starts the
    output layer's bias there instead of at 0.

    Under stage 3, transformers' DeepSpeed integration (an `HfDeepSpeedConfig` alive during the
    call) builds or loads the model inside `deepspeed.zero.Init`, so no rank ever holds the whole
    model. The integration is switched off again afterwards, so later plain loads (export
    verification) are not partitioned by accident.
    """
    import torch
    from transformers import AutoConfig
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    config = AutoConfig.from_pretrained(
        model_dir,
        **task.model_config(label_names),
        problem_type=task.problem_type,  # the loss the task decides, saved with the export
    )
    model_class = task.model_class()
    zero3 = ds_config["zero_optimization"]["stage"] == 3
    hf_ds_config = HfDeepSpeedConfig(ds_config) if zero3 else None
    torch.manual_seed(seed)
    try:
        if has_weights(model_dir):
            model = model_class.from_pretrained(model_dir, config=config)
        else:
            config.vocab_size = vocab_size
            model = model_class.from_config(config)
    finally:
        del hf_ds_config
        unset_hf_deepspeed_config()
    if output_bias is not None:
        set_output_bias(model, output_bias, zero3)
    model.config.architectures = [type(model).__name__]  # what it is now (a pretrain export is a masked LM)
    if gradient_checkpointing:
        if not model.supports_gradient_checkpointing:
            raise ConfigError(f"model: {model_dir} ({config.model_type}) does not support gradient checkpointing")
        # Non-reentrant checkpointing: the one PyTorch recommends, and it works with ZeRO-3's
        # parameter hooks (the reentrant one re-gathers inside a nested autograd call).
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False  # a decoder cache means nothing to a classifier; transformers warns otherwise
    return model


def set_output_bias(model, values: list[float], zero3: bool) -> None:
    """Set the bias of the model's output layer (its last linear layer with one output per value);
    under ZeRO-3 the partitioned bias is gathered, set on rank 0 and partitioned again."""
    import deepspeed
    import torch

    layer = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m.out_features == len(values)][-1]
    gathered = deepspeed.zero.GatheredParameters([layer.bias], modifier_rank=0) if zero3 else contextlib.nullcontext()
    with gathered, torch.no_grad():
        layer.bias.copy_(torch.tensor(values, dtype=layer.bias.dtype))
