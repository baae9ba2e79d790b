"""`python -m pipeline verify-accumulation --ds-config F [F ...]`: does accumulation equal the big batch?

For each config, one optimizer step on a fixed, seeded batch runs twice from the same initial
weights: as `accumulation` micro-batches of `micro` records (the config's own layout) and as one
micro-batch of `micro x accumulation` records with accumulation 1. Both go through the pipeline's
way of training (`engine.backward` and `engine.step` on every micro-batch, no loss division). It
reports the largest difference of the accumulated gradient and of the updated (fp32 master)
parameters, each relative to its own scale, against the precision's tolerance; exit 1 when over.

Both are checked because Adam's update barely depends on the gradient's scale: a loss divided once
too often (the double-scaling bug of transformers PR #35808) changes the gradient by the
accumulation factor but the first Adam step hardly at all.

Runs in a plain process (one rank) or under the `deepspeed` launcher (every rank takes its share of
the batch). The config's micro batch and accumulation are kept (an "auto" accumulation is derived
from `train_batch_size` for the ranks running here, as training would); `train_batch_size` is then
re-derived, and the scheduler is dropped (a warmup schedule's first step has learning rate 0, which
would make both sides trivially equal).
"""
from __future__ import annotations

import os
from . import dist
from .config import TINY_MODEL_DIR, ConfigError, Hardware, TrainConfig, ds_precision, load_json, resolve_batch, resolve_ds_config

# Largest relative difference accepted: fp32 differs only by summation order; 16-bit forward passes
# round differently for different batch shapes.
TOLERANCE = {"fp32": 1e-4, "bf16": 0.1, "fp16": 0.05}
LABELS = ["a", "b"]
BREAKS = ("extra-loss-division",)


def fixed_batch(vocab_size: int, records: int, seq_len: int, seed: int) -> list[dict]:
    """Seeded records of random tokens with random lengths (padding differs between layouts)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(seq_len // 2, seq_len + 1, (records,), generator=g)
    ids = torch.randint(5, vocab_size, (records, seq_len), generator=g)
    labels = torch.randint(0, len(LABELS), (records,), generator=g)
    return [{"input_ids": ids[i, :n], "labels": labels[i]} for i, n in enumerate(lengths.tolist())]


def collate(records: list[dict], device) -> dict:
    """Pad to the micro-batch's longest record, as the pipeline's collator does."""
    import torch

    longest = max(len(r["input_ids"]) for r in records)
    ids = torch.zeros(len(records), longest, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(records):
        ids[i, : len(r["input_ids"])], mask[i, : len(r["input_ids"])] = r["input_ids"], 1
    batch = {"input_ids": ids, "attention_mask": mask, "labels": torch.stack([r["labels"] for r in records])}
    return {k: v.to(device) for k, v in batch.items()}


def one_step(model_dir: str, ds: dict, records: list[dict], seed: int, broken: str = ""):
    """One optimizer step over `records` (this rank's share) with `ds`'s micro batch and accumulation.
    Returns (gradients at the window's boundary, fp32 parameters before and after the step), by name."""
    from transformers import AutoConfig
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad

    from .engine import build_engine
    from .model import build_model

    model = build_model(model_dir, LABELS, AutoConfig.from_pretrained(model_dir).vocab_size, ds, seed)
    engine = build_engine(model, ds)
    engine.eval()  # dropout masks depend on the batch shape; without dropout both layouts compute the same function
    micro, accum = ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]
    fp32_params = lambda: {n: safe_get_full_fp32_param(p).float().clone() for n, p in engine.module.named_parameters()}
    before, grads = fp32_params(), {}
    for start in range(0, micro * accum, micro):
        loss = engine(**collate(records[start:start + micro], engine.device)).loss
        if broken == "extra-loss-division":
            loss = loss / accum  # the bug under audit: DeepSpeed already divides by accum in backward
        engine.backward(loss)
        if engine.is_gradient_accumulation_boundary():
            grads = {n: safe_get_full_grad(p).float().clone() for n, p in engine.module.named_parameters()}
        engine.step()
    return grads, before, fp32_params()


def compare(a: dict, b: dict, scale: dict) -> tuple[float, float]:
    """(largest |a - b| over all tensors, ||a - b|| / ||scale|| over all of them together).

    The verdict uses the norm: with Adam, a gradient near zero moves its weight by up to the
    learning rate in either direction, so single elements may differ by a full update although
    the step as a whole agrees."""
    import torch

    largest = max(float((a[k] - b[k]).abs().max()) for k in b)
    norm = lambda d: float(torch.sqrt(sum((v.double() ** 2).sum() for v in d.values())))
    return largest, norm({k: a[k] - b[k] for k in b}) / max(norm(scale), 1e-30)


def audit(path: str, args) -> bool:
    raw = load_json(path)
    world = dist.world_size()
    micro = args.micro_batch or raw.get("train_micro_batch_size_per_gpu")
    accum = args.accumulation or raw.get("gradient_accumulation_steps")
    if accum in (None, "auto") and isinstance(micro, int):  # from the global batch, as training on these ranks
        accum = resolve_batch(path, {**raw, "train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": "auto"}, world)[2]
    if not all(isinstance(v, int) and v >= 1 for v in (micro, accum)):
        raise ConfigError(f"{path}: micro batch and accumulation must be numbers here (got {micro!r}, {accum!r}); "
                          "give --micro-batch and --accumulation")
    if accum == 1:
        raise ConfigError(f"{path}: accumulation 1 has nothing to compare; give --accumulation N")
    raw = {k: v for k, v in raw.items() if k not in ("train_batch_size", "scheduler")}
    raw.update(train_micro_batch_size_per_gpu=micro, gradient_accumulation_steps=accum)
    ds = resolve_ds_config(path, raw, world, Hardware.detect(), TrainConfig(precision=args.precision)).ds
    big = {**ds, "train_micro_batch_size_per_gpu": micro * accum, "gradient_accumulation_steps": 1}
    precision, tolerance = ds_precision(ds), TOLERANCE[ds_precision(ds)]

    from transformers import AutoConfig

    records = fixed_batch(AutoConfig.from_pretrained(args.model).vocab_size, micro * accum * world, args.seq_len, args.seed)
    share = records[dist.rank() * micro * accum:(dist.rank() + 1) * micro * accum]
    grads, _, params = one_step(args.model, ds, share, args.seed, args.inject_bug)
    big_grads, start, big_params = one_step(args.model, big, share, args.seed)
    update = {k: big_params[k] - start[k] for k in start}
    grad_diff, grad_rel = compare(grads, big_grads, big_grads)
    param_diff, param_rel = compare(params, big_params, update)
    ok = grad_rel <= tolerance and param_rel <= tolerance
    if dist.is_main():
        print(f"verify-accumulation: {path}: ZeRO-{ds['zero_optimization']['stage']}, {precision}, {world} rank(s): "
              f"{micro} x {accum} accumulated vs {micro * accum} x 1"
              + (f"  [deliberately broken: {args.inject_bug}]" if args.inject_bug else ""))
        print(f"  gradient:   largest |accumulated - big batch| {grad_diff:.3g}; "
              f"||difference|| / ||gradient|| {grad_rel:.3g} (tolerance {tolerance:g})")
        print(f"  parameters: largest |accumulated - big batch| {param_diff:.3g}; "
              f"||difference|| / ||update of the step|| {param_rel:.3g} (tolerance {tolerance:g})")
        print(f"  {'OK' if ok else 'FAILED: accumulation does not equal the big batch'}")
    return ok


def add_parser(sub) -> None:
    p = sub.add_parser("verify-accumulation", help="one optimizer step as a big batch and as accumulated micro-batches: "
                                                   "largest parameter/gradient difference against the precision's tolerance")
    p.add_argument("--ds-config", nargs="+", required=True, help="DeepSpeed JSON file(s) to audit")
    p.add_argument("--precision", default="auto", choices=("auto", "fp16", "bf16", "fp32"),
                   help="as for train; fp16 configs need a GPU, audit them on the CPU with --precision fp32")
    p.add_argument("--model", default=str(TINY_MODEL_DIR), help="model directory (default: the tiny BERT, random init)")
    p.add_argument("--seq-len", type=int, default=64, help="longest record in tokens")
    p.add_argument("--micro-batch", type=int, default=0, help="override the config's micro batch")
    p.add_argument("--accumulation", type=int, default=0, help="override the config's accumulation steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--inject-bug", default="", choices=("",) + BREAKS,
                   help="run the accumulated side with a known bug, to see the audit fail")


def standalone_rank() -> None:
    """Outside the launcher, this process is the only rank of its own process group."""
    if "RANK" not in os.environ and "OMPI_COMM_WORLD_RANK" not in os.environ:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def main(args) -> int:
    standalone_rank()
    dist.init(timeout_minutes=5)
    results = [audit(path, args) for path in args.ds_config]
    return 0 if all(results) else 1
