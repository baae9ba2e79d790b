"""`python -m pipeline verify-accumulation --ds-config F [F ...]`: does accumulation equal the big batch?

For each config, one optimizer step on a fixed, seeded batch runs twice from the same initial
weights: as `accumulation` micro-batches of `micro` records (the config's own layout) and as one
micro-batch of `micro x accumulation` records with accumulation 1. Both go through the pipeline's
own micro-step (`train.micro_step`: `engine.backward` and `engine.step` on every micro-batch, no
loss division), so the audit checks the loop that trains. It reports the largest difference of the
accumulated gradient and of the updated (fp32 master) parameters, each relative to its own scale,
against the precision's tolerance; exit 1 when over.

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

from ..core import dist
from ..core.base import ConfigError, load_json
from ..core.ds_config import Hardware, ds_precision, resolve_batch, resolve_ds_config
from ..core.options import TINY_MODEL_DIR, TrainConfig
from .common import LABELS, collate, fixed_batch, standalone_rank

# Largest relative difference accepted: fp32 differs only by summation order; 16-bit forward passes
# round differently for different batch shapes.
TOLERANCE = {"fp32": 1e-4, "bf16": 0.1, "fp16": 0.05}
BREAKS = ("extra-loss-division",)


class Audited:
    """The engine as `train.micro_step` sees it, plus what the audit needs: the full gradients taken
    at the window's boundary, just before the step consumes them, and optionally the bug under audit
    (each micro-batch loss divided by the accumulation steps, which DeepSpeed's `backward` already does)."""

    def __init__(self, engine, broken: str = ""):
        self.engine, self.broken, self.grads = engine, broken, {}

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def __call__(self, **batch):
        out = self.engine(**batch)
        if self.broken == "extra-loss-division":
            out.loss = out.loss / self.engine.gradient_accumulation_steps()
        return out

    def step(self):
        from deepspeed.utils import safe_get_full_grad

        if self.engine.is_gradient_accumulation_boundary():
            self.grads = {n: safe_get_full_grad(p).float().clone() for n, p in self.engine.module.named_parameters()}
        self.engine.step()


def one_step(model_dir: str, ds: dict, records: list[dict], seed: int, broken: str = ""):
    """One optimizer step over `records` (this rank's share) with `ds`'s micro batch and accumulation.
    Returns (gradients at the window's boundary, fp32 parameters before and after the step), by name."""
    from deepspeed.utils import safe_get_full_fp32_param
    from transformers import AutoConfig

    from ..train.loop import micro_step
    from ..train.model import build_engine, build_model

    model = build_model(model_dir, LABELS, AutoConfig.from_pretrained(model_dir).vocab_size, ds, seed)
    engine = Audited(build_engine(model, ds), broken)
    engine.eval()  # dropout masks depend on the batch shape; without dropout both layouts compute the same function
    micro, accum = ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]

    def fp32_params() -> dict:
        return {n: safe_get_full_fp32_param(p).float().clone() for n, p in engine.module.named_parameters()}

    before = fp32_params()
    for start in range(0, micro * accum, micro):
        micro_step(engine, collate(records[start : start + micro], engine.device))
    return engine.grads, before, fp32_params()


def compare(a: dict, b: dict, scale: dict) -> tuple[float, float]:
    """(largest |a - b| over all tensors, ||a - b|| / ||scale|| over all of them together).

    The verdict uses the norm: with Adam, a gradient near zero moves its weight by up to the
    learning rate in either direction, so single elements may differ by a full update although
    the step as a whole agrees."""
    import torch

    def norm(d: dict) -> float:
        return float(torch.sqrt(sum((v.double() ** 2).sum() for v in d.values())))

    largest = max(float((a[k] - b[k]).abs().max()) for k in b)
    return largest, norm({k: a[k] - b[k] for k in b}) / max(norm(scale), 1e-30)


def audit(path: str, args) -> bool:
    raw = load_json(path)
    world = dist.world_size()
    # The options replace the JSON's values; what is left "auto" comes from the global batch, as
    # training on these ranks resolves it.
    derived = dict(raw)
    if args.micro_batch:
        derived.update(train_micro_batch_size_per_gpu=args.micro_batch, gradient_accumulation_steps="auto")
    if args.accumulation:
        derived["gradient_accumulation_steps"] = args.accumulation
        if not args.micro_batch:
            derived["train_micro_batch_size_per_gpu"] = "auto"
    if args.micro_batch and args.accumulation:
        derived["train_batch_size"] = "auto"
    _, micro, accum = resolve_batch(path, derived, world)
    if accum == 1:
        raise ConfigError(f"{path}: accumulation 1 has nothing to compare; give --accumulation N")
    raw = {k: v for k, v in raw.items() if k not in ("train_batch_size", "scheduler")}
    raw.update(train_micro_batch_size_per_gpu=micro, gradient_accumulation_steps=accum)
    cfg = TrainConfig(precision=args.precision, lr_scheduler_type="constant")  # no scheduler, as above
    ds = resolve_ds_config(path, raw, world, Hardware.detect(), cfg).ds
    big = {**ds, "train_micro_batch_size_per_gpu": micro * accum, "gradient_accumulation_steps": 1}
    precision, tolerance = ds_precision(ds), TOLERANCE[ds_precision(ds)]

    from transformers import AutoConfig

    records = fixed_batch(AutoConfig.from_pretrained(args.model).vocab_size, micro * accum * world, args.seq_len, args.seed)
    share = records[dist.rank() * micro * accum : (dist.rank() + 1) * micro * accum]
    grads, _, params = one_step(args.model, ds, share, args.seed, args.inject_bug)
    big_grads, start, big_params = one_step(args.model, big, share, args.seed)
    update = {k: big_params[k] - start[k] for k in start}
    grad_diff, grad_rel = compare(grads, big_grads, big_grads)
    param_diff, param_rel = compare(params, big_params, update)
    ok = grad_rel <= tolerance and param_rel <= tolerance
    if dist.is_main():
        print(
            f"verify-accumulation: {path}: ZeRO-{ds['zero_optimization']['stage']}, {precision}, {world} rank(s): "
            f"{micro} x {accum} accumulated vs {micro * accum} x 1"
            + (f"  [deliberately broken: {args.inject_bug}]" if args.inject_bug else "")
        )
        print(
            f"  gradient:   largest |accumulated - big batch| {grad_diff:.3g}; "
            f"||difference|| / ||gradient|| {grad_rel:.3g} (tolerance {tolerance:g})"
        )
        print(
            f"  parameters: largest |accumulated - big batch| {param_diff:.3g}; "
            f"||difference|| / ||update of the step|| {param_rel:.3g} (tolerance {tolerance:g})"
        )
        print(f"  {'OK' if ok else 'FAILED: accumulation does not equal the big batch'}")
    return ok


def add_arguments(p) -> None:
    p.add_argument("--ds-config", nargs="+", required=True, help="DeepSpeed JSON file(s) to audit")
    p.add_argument(
        "--precision",
        default="auto",
        choices=("auto", "fp16", "bf16", "fp32"),
        help="as for train; fp16 configs need a GPU, audit them on the CPU with --precision fp32",
    )
    p.add_argument("--model", default=str(TINY_MODEL_DIR), help="model directory (default: the tiny BERT, random init)")
    p.add_argument("--seq-len", type=int, default=64, help="longest record in tokens")
    p.add_argument("--micro-batch", type=int, default=0, help="override the config's micro batch")
    p.add_argument("--accumulation", type=int, default=0, help="override the config's accumulation steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--inject-bug",
        default="",
        choices=("",) + BREAKS,
        help="run the accumulated side with a known bug, to see the audit fail",
    )


def main(args) -> int:
    standalone_rank()
    dist.init(timeout_minutes=5)
    results = [audit(path, args) for path in args.ds_config]
    return 0 if all(results) else 1
