"""`python -m pipeline check-config`: resolve a DeepSpeed JSON for a cluster without starting anything.

The world size comes from the hostfile as the `deepspeed` runner would compute it (its own
`fetch_hostfile`, `parse_inclusion_exclusion` and `apply_num_nodes_and_gpus`), and the config is
resolved by the same `resolve_ds_config` every rank runs, so what this prints is what the run uses.
"""
from __future__ import annotations

import re
from collections import OrderedDict
from pathlib import Path

from .config import ConfigError, Hardware, TrainConfig, ds_precision, load_json, resolve_ds_config

# DeepSpeed's runner matches `^(\S+)\s+slots=(\d+)` and ignores the rest of the line, so
# "gpu1 slots=4x" counts 4 and "slots=0" a host with no ranks; this pattern is strict.
HOSTFILE_LINE = re.compile(r"(\S+)\s+slots=(\d+)\s*(#.*)?")
# Host names reach pdsh, ssh and mpirun's command lines (and a shell on the far side): a name
# such as "-oProxyCommand=..." would be read as an option, "node1;id" would run a command.
HOSTNAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")


def _line_of(lines: list[str], predicate) -> int:
    return next((n for n, line in enumerate(lines, 1) if predicate(line.strip())), 0)


def read_hostfile(path: str) -> "OrderedDict[str, int]":
    """host -> slots, parsed by DeepSpeed's runner; its errors and the lines it accepts but should
    not (zero slots, text after the count) become ConfigErrors naming the file and line."""
    from deepspeed.launcher.runner import fetch_hostfile

    if not Path(path).is_file():
        raise ConfigError(f"{path}: hostfile not found (the deepspeed runner would silently use this machine's GPUs)")
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    try:
        pool = fetch_hostfile(path)
    except ValueError as e:
        duplicate = re.search(r"multiple entries for (\S+),", str(e))
        if duplicate:
            host = duplicate[1]
            n = [i for i, line in enumerate(lines, 1) if line.split()[:1] == [host]][1]
            raise ConfigError(f"{path}, line {n}: host {host} is listed twice; give each host one line") from None
        bad = re.search(r"bad entry: (.*), unable", str(e))
        if bad:
            n = _line_of(lines, lambda text: text == bad[1])
            raise ConfigError(f"{path}, line {n}: {bad[1]!r} is not 'HOSTNAME slots=N'") from None
        raise ConfigError(f"{path}: no 'HOSTNAME slots=N' lines") from None
    for n, line in enumerate(lines, 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        match = HOSTFILE_LINE.fullmatch(text)
        if not match:
            raise ConfigError(f"{path}, line {n}: {text!r} is not 'HOSTNAME slots=N' (text after the slot count)")
        if not HOSTNAME.fullmatch(match[1]):
            raise ConfigError(f"{path}, line {n}: {match[1]!r} is not a host name (letters, digits, '.', '-' and '_', "
                              "not starting with '-'); pdsh and ssh would take it as an option or a shell command")
        if int(match[2]) == 0:
            raise ConfigError(f"{path}, line {n}: host {match[1]} has slots=0; give its number of GPUs or remove the line")
    return pool


def world_from_hostfile(path: str, include: str = "", exclude: str = "", num_nodes: int = -1,
                        num_gpus: int = -1) -> "OrderedDict[str, list[int]]":
    """host -> the slots (local ranks) the `deepspeed` runner would start with these options."""
    from deepspeed.launcher.runner import apply_num_nodes_and_gpus, parse_inclusion_exclusion

    pool = read_hostfile(path)
    if (num_nodes > 0 or num_gpus > 0) and (include or exclude):
        raise ConfigError("--num_nodes/--num_gpus cannot be combined with --include/--exclude (the deepspeed runner refuses)")
    try:
        active = parse_inclusion_exclusion(pool, include, exclude)
    except (ValueError, KeyError) as e:
        flag = "--include" if include else "--exclude"
        raise ConfigError(f"{path}: {flag} {include or exclude}: {e}; hosts in the file: {', '.join(pool)}") from None
    if num_nodes > len(pool):
        raise ConfigError(f"{path}: --num_nodes {num_nodes} but the hostfile has {len(pool)} hosts")
    if num_gpus > min(pool.values()):
        raise ConfigError(f"{path}: --num_gpus {num_gpus} but a host has only {min(pool.values())} slots")
    active = apply_num_nodes_and_gpus(active, num_nodes, num_gpus)
    if not active:
        raise ConfigError(f"{path}: no ranks left after --include/--exclude")
    return active


def _params(section: dict | None) -> str:
    if not section:
        return "none"
    params = " ".join(f"{k}={v}" for k, v in (section.get("params") or {}).items())
    return f"{section.get('type')} {params}".strip()


def describe(resolved, world: dict, hw: Hardware, warmup_ratio: float) -> list[str]:
    """The lines check-config prints: world, batch, ZeRO, offload, precision, optimizer, scheduler."""
    ds = resolved.ds
    zero = ds.get("zero_optimization") or {}
    offload = [f"{what} -> {(zero.get(key) or {}).get('device', 'none')}" for key, what in
               (("offload_optimizer", "optimizer"), ("offload_param", "parameters"))
               if (zero.get(key) or {}).get("device", "none") != "none"]
    precision = ds_precision(ds)
    sched = (ds.get("scheduler") or {}).get("params") or {}
    lines = ["hosts: " + ", ".join(f"{host} {len(slots)}" for host, slots in world.items())
             + f" -> world size {sum(len(s) for s in world.values())} on {len(world)} node(s)",
             *resolved.notes,
             f"ZeRO stage {zero.get('stage', 0)}; offload: {', '.join(offload) or 'none'}",
             f"precision: {precision} on {hw.name}",
             f"optimizer: {_params(ds.get('optimizer'))}",
             f"scheduler: {_params(ds.get('scheduler'))}",
             f"gradient clipping: {ds.get('gradient_clipping', 0.0)}"]
    if "auto" in (sched.get("total_num_steps"), sched.get("warmup_num_steps")):
        lines.append(f"  scheduler \"auto\" steps are filled at run time: total = optimizer steps of the run "
                     f"(dataset size / global batch x epochs), warmup = {warmup_ratio:g} x total")
    return lines


def check_config(args) -> int:
    """Print the resolved config for the hostfile's world; 0 when it would run, else raise ConfigError."""
    world = world_from_hostfile(args.hostfile, args.include, args.exclude, args.num_nodes, args.num_gpus)
    world_size = sum(len(slots) for slots in world.values())
    hw = Hardware.named(args.gpu) if args.gpu else Hardware.detect()
    cfg = TrainConfig(ds_config=args.ds_config, precision=args.precision, global_batch=args.global_batch,
                      micro_batch=args.micro_batch, lr_scaling=args.lr_scaling, reference_batch=args.reference_batch)
    resolved = resolve_ds_config(args.ds_config, load_json(args.ds_config), world_size, hw, cfg,
                                 pipeline_rules=not args.deepspeed_only)
    lines = describe(resolved, world, hw, cfg.warmup_ratio)
    if args.model:
        from .plan import memory_for_config

        lines.append(memory_for_config(args.model, resolved.ds, len(world), world_size // len(world), args.seq_len))
    print(f"{args.ds_config}:")
    print("\n".join("  " + line for line in lines))
    for warning in resolved.warnings:
        print(f"warning: {warning}")
    print("ok: no errors")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("check-config", help="resolve and check a DeepSpeed JSON for a hostfile, without starting ranks")
    p.add_argument("--ds-config", required=True, help="DeepSpeed JSON")
    p.add_argument("--hostfile", required=True, help="hostfile the job will be launched with (HOST slots=N lines)")
    p.add_argument("--include", default="", help="as the deepspeed runner's --include (e.g. worker-0@worker-1:0,2)")
    p.add_argument("--exclude", default="", help="as the deepspeed runner's --exclude")
    p.add_argument("--num_nodes", "--num-nodes", dest="num_nodes", type=int, default=-1, help="as the deepspeed runner's")
    p.add_argument("--num_gpus", "--num-gpus", dest="num_gpus", type=int, default=-1, help="as the deepspeed runner's")
    p.add_argument("--gpu", default="", help="the cluster's accelerator: cpu, v100, t4, a100, a10, a40, l4, h100, h200 "
                                             "(default: this machine's)")
    p.add_argument("--model", default="", help="model directory or config.json: adds the per-GPU memory estimate")
    p.add_argument("--seq-len", type=int, default=512, help="sequence length for the memory estimate")
    p.add_argument("--deepspeed-only", action="store_true",
                   help="check only what DeepSpeed needs, not this pipeline's rules (for configs of other trainers)")
    defaults = TrainConfig()
    for name in ("precision", "global_batch", "micro_batch", "lr_scaling", "reference_batch"):
        f = next(f for f in TrainConfig.__dataclass_fields__.values() if f.name == name)
        p.add_argument("--" + name.replace("_", "-"), dest=name, type={"str": str, "int": int}[f.type],
                       default=getattr(defaults, name), help=f.metadata["help"])
