"""`python -m pipeline plan`: what fits on a cluster, per ZeRO strategy, without loading weights.

Per GPU = model states + activations of one micro batch + communication buckets, against the GPU's
memory less a safety margin (CUDA context, allocator fragmentation, temporaries).
- Model states: DeepSpeed's own estimators (the functions behind
  `estimate_zero2/3_model_states_mem_needs_all_cold`): 16-bit weights and gradients, fp32 master
  weights and Adam moments, i.e. 2P + 18P/N bytes for ZeRO-2, 4 x largest layer + 18P/N for ZeRO-3.
  DeepSpeed has none for ZeRO-1; by the same count (its estimator's 18 = 2 for 16-bit gradients +
  16 for fp32 gradients, master weights and moments, stage_1_and_2.py:4029-4031) ZeRO-1, which keeps
  the 16-bit gradients whole, needs 4P + 16P/N.
- Activations: Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer
  Models"), per layer s*b*(15h + 4i) + 5*a*s^2*b bytes in 16-bit without recomputation, i = the MLP
  width (34*s*b*h + 5*a*s^2*b for i = 4h). The s^2 term is eager attention's (the softmax, its
  dropout mask and output). The model's own attention is what counts: transformers 5 gives BERT
  and most models SDPA unless told otherwise (modeling_utils.py:1856, get_correct_attn_implementation),
  whose fused kernels (memory-efficient, flash) keep their output and a logsumexp per head and
  position instead, 2*s*b*h + 4*a*s*b bytes, and recompute the scores in backward. (SDPA's math
  fallback, e.g. bf16 below compute capability 8.0, keeps the s^2 matrices; training refuses bf16 there.)
- Communication buckets: with overlap_comm DeepSpeed holds about 4.5x the reduce and allgather
  bucket sizes (Hugging Face's DeepSpeed guide: 5e8-element buckets cost 9 GB; DeepSpeed
  double-buffers the reduce bucket, stage_1_and_2.py:3262-3278).
- The parameter count comes from building the model on the meta device: no weights are allocated.

Strategies run from ZeRO-1 up: the lowest stage that fits communicates least (DeepSpeed's autotuner
found ZeRO-1 ~9% faster than ZeRO-2 for BERT-large). ZeRO-0 is not offered: training refuses it
(core/ds_config.py: the export is consolidated from ZeRO shards), and ZeRO-1 keeps plain data
parallelism's communication volume (the ZeRO paper's P_os, Rajbhandari et al. 2020) in less memory.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .. import tasks
from ..core.base import ConfigError, load_json

GIB = 1024**3
BUCKET = int(5e7)  # reduce/allgather/prefetch bucket elements in the configs written here (DeepSpeed's default is 5e8)
OVERLAP_COMM_FACTOR = 4.5  # overlap_comm's memory in bucket sizes (module docstring)
STRATEGIES = {"zero1": 1, "zero2": 2, "zero3": 3, "zero3_offload": 3}  # name: ZeRO stage
WHOLE = {"zero0": 18, "zero1": 2, "zero2": 0}  # of ZeRO-2's 18 partitioned bytes per parameter, those kept whole


@dataclass(frozen=True)
class ModelShape:
    params: int
    largest_layer: int  # parameters of the largest single module (what ZeRO-3 gathers at once)
    hidden: int
    intermediate: int
    layers: int
    heads: int
    attention: str = "sdpa"  # the model's attention implementation (config._attn_implementation)


def model_shape(model: str) -> ModelShape:
    """Count parameters of `model` (a directory or a config.json) built on the meta device."""
    import torch
    from transformers import AutoConfig

    path = Path(model)
    if not (path / "config.json").is_file() and not (path.suffix == ".json" and path.is_file()):
        raise ConfigError(f"--model {model}: expected a model directory with config.json, or a config.json")
    load_json(path if path.suffix == ".json" else path / "config.json")  # a syntax error as one line, not a traceback
    config = AutoConfig.from_pretrained(str(path))
    with torch.device("meta"):
        net = tasks.by_problem_type(config.problem_type, str(model)).model_class().from_config(config)
    params = sum(p.numel() for p in net.parameters())  # parameters() yields tied weights once
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in net.modules())
    hidden = config.hidden_size
    return ModelShape(
        params,
        largest,
        hidden,
        getattr(config, "intermediate_size", 4 * hidden),
        config.num_hidden_layers,
        config.num_attention_heads,
        net.config._attn_implementation,  # as transformers resolved it for this model, as in training
    )


def activation_bytes(shape: ModelShape, micro: int, seq: int, bytes_per_value: int = 2, recompute: bool = False) -> int:
    """Activations kept for backward by one micro batch (Korthikanti et al. 2022).

    With recomputation (`--gradient-checkpointing 1`: full activation recomputation in the paper's
    terms) each layer keeps only its input, s*b*h values, and one layer's activations are rebuilt
    at a time during backward."""
    s, b, h, i, a = seq, micro, shape.hidden, shape.intermediate, shape.heads
    scores = 5 * a * s * s * b if shape.attention == "eager" else 2 * s * b * h + 4 * a * s * b  # module docstring
    per_layer = s * b * (15 * h + 4 * i) + scores  # bytes at 2 bytes per value
    kept = shape.layers * 2 * s * b * h + per_layer if recompute else shape.layers * per_layer
    return int(kept * bytes_per_value / 2)


def model_state_bytes(shape: ModelShape, strategy: str, nodes: int, gpus_per_node: int) -> tuple[int, int]:
    """(per-GPU, per-node CPU) bytes of model states from DeepSpeed's estimators."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    if strategy in WHOLE:
        cpu, gpu = estimate_zero2_model_states_mem_needs(shape.params, gpus_per_node, nodes, cpu_offload=False)
        gpu += int(WHOLE[strategy] * shape.params * (1 - 1 / (nodes * gpus_per_node)))
    else:
        offload = strategy == "zero3_offload"
        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
            shape.params,
            shape.largest_layer,
            gpus_per_node,
            nodes,
            cpu_offload=offload,
            cpu_offload_params=offload,
            zero_init=True,
        )
    return gpu, cpu


@dataclass
class Option:
    strategy: str
    states: int
    cpu: int
    buffers: int
    max_micro: int  # largest micro batch that fits (0: none)
    micro: int  # largest fitting micro batch that divides the per-rank share of the global batch
    accum: int
    per_gpu: int  # total at `micro`


def plan(
    shape: ModelShape,
    nodes: int,
    gpus_per_node: int,
    gpu_mem: int,
    seq: int,
    global_batch: int,
    margin: float = 0.15,
    recompute: bool = False,
) -> list[Option]:
    world = nodes * gpus_per_node
    if global_batch % world:
        raise ConfigError(
            f"--global-batch {global_batch} is not divisible by the world size {world} "
            f"(nearest: {global_batch // world * world or world} or {(global_batch // world + 1) * world})"
        )
    budget = gpu_mem * (1 - margin)
    options = []
    for strategy in STRATEGIES:
        states, cpu = model_state_bytes(shape, strategy, nodes, gpus_per_node)
        buffers = int(OVERLAP_COMM_FACTOR * 2 * BUCKET * 2)  # a reduce and an allgather/prefetch bucket, 16-bit
        room = budget - states - buffers
        per_sample = activation_bytes(shape, 1, seq, recompute=recompute)
        max_micro = max(0, int(room // per_sample))
        per_rank = global_batch // world
        micro = max((d for d in range(1, min(max_micro, per_rank) + 1) if per_rank % d == 0), default=0)
        accum = per_rank // micro if micro else 0
        options.append(
            Option(
                strategy,
                states,
                cpu,
                buffers,
                max_micro,
                micro,
                accum,
                states + buffers + activation_bytes(shape, max(micro, 1), seq, recompute=recompute),
            )
        )
    return options


def recommend(options: list[Option]) -> Option | None:
    """The lowest ZeRO stage that fits (least communication); CPU offload only when nothing else does."""
    return next((o for o in options if o.micro), None)


def ds_config_for(option: Option, global_batch: int, lr: float) -> dict:
    """A DeepSpeed JSON for `option`: the global batch fixed, accumulation derived at run time."""
    zero = {
        "stage": STRATEGIES[option.strategy],
        "overlap_comm": True,
        "contiguous_gradients": True,
        "reduce_bucket_size": BUCKET,
        "allgather_bucket_size": BUCKET,
    }
    if STRATEGIES[option.strategy] == 3:
        del zero["allgather_bucket_size"]  # a stage-1/2 setting
        zero.update(stage3_prefetch_bucket_size=BUCKET, stage3_param_persistence_threshold=int(1e5))
    if option.strategy == "zero3_offload":
        zero.update(offload_optimizer={"device": "cpu", "pin_memory": True}, offload_param={"device": "cpu", "pin_memory": True})
    return {
        "train_batch_size": global_batch,
        "train_micro_batch_size_per_gpu": option.micro,
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": 1.0,
        "optimizer": {"type": "AdamW", "params": {"lr": lr, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.01}},
        "scheduler": {
            "type": "WarmupDecayLR",
            "params": {"warmup_min_lr": 0, "warmup_max_lr": lr, "warmup_num_steps": "auto", "total_num_steps": "auto"},
        },
        "fp16": {
            "enabled": "auto",
            "loss_scale": 0,
            "initial_scale_power": 16,
            "loss_scale_window": 1000,
            "hysteresis": 2,
            "min_loss_scale": 1,
        },
        "bf16": {"enabled": "auto"},
        "zero_optimization": zero,
        "steps_per_print": 100,
    }


def parse_size(text: str) -> int:
    units = {"gib": GIB, "gb": 10**9, "mib": 1024**2, "mb": 10**6}
    for unit, factor in units.items():
        if text.lower().endswith(unit):
            try:
                return int(float(text[: -len(unit)]) * factor)
            except ValueError:
                break
    raise ConfigError(f"--gpu-mem {text!r}: expected a size such as 16GiB, 80GB or 512MiB")


def _gib(n: int) -> str:
    return f"{n / GIB:.2f} GiB"


def memory_for_config(model: str, ds: dict, nodes: int, gpus_per_node: int, seq: int) -> str:
    """One line for check-config: the per-GPU estimate of a resolved DeepSpeed config."""
    shape = model_shape(model)
    zero = ds.get("zero_optimization") or {}
    offloaded = (zero.get("offload_param") or {}).get("device", "none") != "none"
    strategy = f"zero{zero.get('stage', 0)}" if zero.get("stage", 0) < 3 else "zero3_offload" if offloaded else "zero3"
    states, _ = model_state_bytes(shape, strategy, nodes, gpus_per_node)
    micro = ds["train_micro_batch_size_per_gpu"]
    acts = activation_bytes(shape, micro, seq, 2 if ds["fp16"]["enabled"] or ds["bf16"]["enabled"] else 4)
    return (
        f"memory per GPU ({shape.params / 1e6:.0f}M parameters, seq {seq}, micro {micro}): model states "
        f"{_gib(states)} + activations {_gib(acts)} = {_gib(states + acts)} (estimate; see `python -m pipeline plan`)"
    )


def run_plan(args) -> int:
    shape = model_shape(args.model)
    gpu_mem = parse_size(args.gpu_mem)
    recompute = bool(args.gradient_checkpointing)
    options = plan(shape, args.nodes, args.gpus_per_node, gpu_mem, args.seq_len, args.global_batch, args.margin, recompute)
    world = args.nodes * args.gpus_per_node
    print(
        f"{args.model}: {shape.params / 1e6:.1f}M parameters (largest layer {shape.largest_layer / 1e6:.1f}M), "
        f"{args.nodes} node(s) x {args.gpus_per_node} GPUs of {_gib(gpu_mem)}, seq {args.seq_len}, "
        f"global batch {args.global_batch}; budget {_gib(int(gpu_mem * (1 - args.margin)))} per GPU "
        f"({args.margin:.0%} margin)"
    )
    print(
        f"activations: {_gib(activation_bytes(shape, 1, args.seq_len, recompute=recompute))} per sample (16-bit, {shape.attention} attention, "
        f"{'gradient checkpointing: each layer keeps its input only' if recompute else 'no recomputation'})"
    )
    print(
        f"{'strategy':<14} {'model states/GPU':>16} {'host RAM/node':>14} {'max micro':>9} {'micro x accum x world':>22} {'total/GPU':>10}"
    )
    for o in options:
        layout = f"{o.micro} x {o.accum} x {world}" if o.micro else "does not fit"
        print(
            f"{o.strategy:<14} {_gib(o.states):>16} {_gib(o.cpu):>14} {o.max_micro:>9} {layout:>22} "
            f"{_gib(o.per_gpu) if o.micro else '-':>10}"
        )
    best = recommend(options)
    if best is None:
        hint = "" if recompute else ", or --gradient-checkpointing 1 (here and in training)"
        print(f"recommendation: nothing fits; use more GPUs, a shorter --seq-len{hint}")
        return 1
    print(
        f"recommendation: {best.strategy} with micro batch {best.micro} x accumulation {best.accum} "
        f"(lowest ZeRO stage that fits; offload only when nothing else does)"
    )
    if args.write:
        Path(args.write).write_text(
            json.dumps(ds_config_for(best, args.global_batch, args.lr), indent=2) + "\n", encoding="utf-8"
        )
        print(
            f'wrote {args.write} (gradient_accumulation_steps "auto": derived from the world size at run time)'
            + ("; train with --gradient-checkpointing 1" if recompute else "")
        )
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("plan", help="per-GPU memory for ZeRO-1/2/3/3+offload, the largest micro batch, a DeepSpeed JSON")
    p.add_argument("--model", required=True, help="model directory or config.json (weights are not loaded)")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--gpu-mem", default="16GiB", help="memory of one GPU, e.g. 16GiB (V100), 80GiB (A100/H100)")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--global-batch", type=int, default=256)
    p.add_argument("--margin", type=float, default=0.15, help="share of GPU memory kept free (CUDA context, fragmentation)")
    p.add_argument("--lr", type=float, default=2e-5, help="learning rate written to --write's config")
    p.add_argument("--write", default="", help="write the recommended DeepSpeed JSON here")
    p.add_argument(
        "--gradient-checkpointing",
        type=int,
        choices=(0, 1),
        default=0,
        help="1: plan for training with --gradient-checkpointing 1 (activations recomputed in backward)",
    )
