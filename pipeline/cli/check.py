"""`python -m pipeline check-config`: resolve a DeepSpeed JSON for a cluster without starting anything.

The world size comes from the hostfile as the `deepspeed` runner would compute it (its own
`fetch_hostfile`, `parse_inclusion_exclusion` and `apply_num_nodes_and_gpus`), and the config is
resolved by the same `resolve_ds_config` every rank runs, so what this prints is what the run uses.
"""

from __future__ import annotations

from pathlib import Path

from ..core.base import load_json
from ..core.ds_config import Hardware, ds_precision, resolve_ds_config
from ..core.options import DS_CONFIG_OPTIONS, TINY_MODEL_DIR, TrainConfig, add_train_options
from ..launch.hosts import world_from_hostfile


def _params(section: dict | None) -> str:
    if not section:
        return "none"
    params = " ".join(f"{k}={v}" for k, v in (section.get("params") or {}).items())
    return f"{section.get('type')} {params}".strip()


def offloads(ds: dict) -> list[str]:
    """What the config moves off the GPU, e.g. ["optimizer -> cpu", "parameters -> cpu"]."""
    zero = ds.get("zero_optimization") or {}
    return [
        f"{what} -> {(zero.get(key) or {}).get('device', 'none')}"
        for key, what in (("offload_optimizer", "optimizer"), ("offload_param", "parameters"))
        if (zero.get(key) or {}).get("device", "none") != "none"
    ]


def describe(resolved, world: dict, hw: Hardware) -> list[str]:
    """The lines check-config prints: world, batch, ZeRO, offload, precision, optimizer, scheduler."""
    ds = resolved.ds
    zero = ds.get("zero_optimization") or {}
    offload = offloads(ds)
    precision = ds_precision(ds)
    sched = (ds.get("scheduler") or {}).get("params") or {}
    lines = [
        "hosts: "
        + ", ".join(f"{host} {len(slots)}" for host, slots in world.items())
        + f" -> world size {sum(len(s) for s in world.values())} on {len(world)} node(s)",
        *resolved.notes,
        f"ZeRO stage {zero.get('stage', 0)}; offload: {', '.join(offload) or 'none'}",
        f"precision: {precision} on {hw.name}",
        f"optimizer: {_params(ds.get('optimizer'))}",
        f"scheduler: {_params(ds.get('scheduler'))}",
        f"gradient clipping: {ds.get('gradient_clipping', 0.0)}",
    ]
    if "auto" in (sched.get("total_num_steps"), sched.get("warmup_num_steps")):
        lines.append(
            'scheduler "auto" steps are filled at run time: total = optimizer steps of the run '
            "(dataset size / global batch x epochs), warmup as above"
        )
    return lines


def resolve_for_hosts(args, hw: Hardware, model: str, pipeline_rules: bool = True) -> tuple:
    """(the config resolved for the hostfile's world on `hw`, that world {host: slots}): what
    check-config prints and `smoke` checks first; a ConfigError names what does not fit."""
    world = world_from_hostfile(args.hostfile, args.include, args.exclude, args.num_nodes, args.num_gpus)
    world_size = sum(len(slots) for slots in world.values())
    options = {name: getattr(args, name) for name in DS_CONFIG_OPTIONS if getattr(args, name) is not None}
    cfg = TrainConfig(ds_config=args.ds_config, model=model, **options)
    resolved = resolve_ds_config(args.ds_config, load_json(args.ds_config), world_size, hw, cfg, pipeline_rules=pipeline_rules)
    return resolved, world


def check_config(args) -> int:
    """Print the resolved config for the hostfile's world; 0 when it would run, else raise ConfigError."""
    hw = Hardware.named(args.gpu) if args.gpu else Hardware.detect()
    # The model decides the default learning rate (pretrained weights or not).
    model = str(Path(args.model).parent if args.model.endswith(".json") else args.model or TINY_MODEL_DIR)
    resolved, world = resolve_for_hosts(args, hw, model, pipeline_rules=not args.deepspeed_only)
    lines = describe(resolved, world, hw)
    if args.model:
        from .plan import memory_for_config

        world_size = sum(len(slots) for slots in world.values())
        lines.append(memory_for_config(args.model, resolved.ds, len(world), world_size // len(world), args.seq_len))
    print(f"{args.ds_config}:")
    print("\n".join("  " + line for line in lines))
    for warning in resolved.warnings:
        print(f"warning: {warning}")
    print("ok: no errors")
    return 0


def add_host_arguments(p) -> None:
    """--ds-config, the hostfile and the deepspeed runner's filters on it, and the options that decide the config."""
    p.add_argument("--ds-config", required=True, help="DeepSpeed JSON")
    p.add_argument("--hostfile", required=True, help="hostfile the job will be launched with (HOST slots=N lines)")
    p.add_argument("--include", default="", help="as the deepspeed runner's --include (e.g. worker-0@worker-1:0,2)")
    p.add_argument("--exclude", default="", help="as the deepspeed runner's --exclude")
    p.add_argument("--num_nodes", "--num-nodes", dest="num_nodes", type=int, default=-1, help="as the deepspeed runner's")
    p.add_argument("--num_gpus", "--num-gpus", dest="num_gpus", type=int, default=-1, help="as the deepspeed runner's")
    add_train_options(p, only=DS_CONFIG_OPTIONS)


def add_parser(sub) -> None:
    p = sub.add_parser("check-config", help="resolve and check a DeepSpeed JSON for a hostfile, without starting ranks")
    add_host_arguments(p)
    p.add_argument(
        "--gpu",
        default="",
        help="the cluster's accelerator: cpu, v100, t4, a100, a10, a40, l4, h100, h200 (default: this machine's)",
    )
    p.add_argument("--model", default="", help="model directory or config.json: adds the per-GPU memory estimate")
    p.add_argument("--seq-len", type=int, default=512, help="sequence length for the memory estimate")
    p.add_argument(
        "--deepspeed-only",
        action="store_true",
        help="check only what DeepSpeed needs, not this pipeline's rules (for configs of other trainers)",
    )
