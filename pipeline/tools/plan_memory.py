"""Measure the memory of real ZeRO training steps against the planner's estimate (one rank).

    python -m pipeline.tools.plan_memory --device cuda --out plan_memory.md      # GPU, < 5 minutes
    python -m pipeline.tools.plan_memory --device cpu --hidden 256 --layers 4 --micro 1 4

On a GPU it records torch.cuda.max_memory_allocated after the engine is built (model states) and
after steps of each micro batch, for a BERT-large-shaped model (1024 hidden, 24 layers, 16 heads) at
seq 512 under ZeRO-2 and ZeRO-3, fp16, each step through the pipeline's `train.micro_step`. On the
CPU (DeepSpeed's CPU accelerator, bf16) there is no allocator counter, so a thread samples the
process's anonymous resident memory every millisecond and keeps the peak above what it held before
the model was built. Anonymous only: the file-backed pages of the mapped libraries (torch alone maps
hundreds of MB) come and go with the machine's page cache, and once made a CI run's slope 14.8 bytes
per parameter where the development machine measured 22.1. glibc's mmap threshold is fixed at 128
KiB: every tensor then gets its own mapping that goes back to the system when freed, so the sample
follows live memory rather than heap fragmentation (with the adaptive threshold the per-parameter
slope moved between 23.6 and 25.1 bytes across runs).
Prints one JSON object per measurement and, with --out, a Markdown table.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import threading
import time

from ..core import dist
from .common import collate, fixed_batch, standalone_rank

GIB = 1024**3


def anon_rss() -> int:
    """Resident memory not backed by a file: statm's resident minus its shared (file-backed) pages."""
    with open("/proc/self/statm") as f:
        fields = f.read().split()
    return (int(fields[1]) - int(fields[2])) * os.sysconf("SC_PAGE_SIZE")


class AnonPeak:
    """The highest `anon_rss()` seen since `reset()`, sampled by a daemon thread (torch's kernels
    release the GIL, so the sampler runs while a step computes)."""

    def __init__(self, interval_s: float = 0.001):
        self.peak = anon_rss()
        threading.Thread(target=self._sample, args=(interval_s,), daemon=True).start()

    def _sample(self, interval_s: float) -> None:
        while True:
            self.peak = max(self.peak, anon_rss())
            time.sleep(interval_s)

    def reset(self) -> None:
        self.peak = anon_rss()


def fix_mmap_threshold(size: int = 128 * 1024) -> None:
    M_MMAP_THRESHOLD = -3  # from glibc's malloc.h; setting it also turns off the adaptive threshold
    if not ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, size):
        raise RuntimeError("mallopt(M_MMAP_THRESHOLD) failed: peak RSS would not follow live memory")


def measure(
    device: str, stage: int, hidden: int, layers: int, heads: int, micros: list[int], seq: int, steps: int, sampler=None
) -> dict:
    """`sampler`: the process's one AnonPeak (CPU only)."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    from ..cli.plan import ModelShape, activation_bytes, model_state_bytes
    from ..train.loop import micro_step
    from ..train.model import build_engine

    cuda = device == "cuda"
    precision = "fp16" if cuda else "bf16"  # the 16-bit mixed precision DeepSpeed's estimators assume
    config = BertConfig(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=4 * hidden,
        vocab_size=21128,
        max_position_embeddings=max(512, seq),
        num_labels=2,
        attn_implementation="eager",
    )
    if not cuda:
        sampler.reset()
    baseline = torch.cuda.memory_allocated() if cuda else sampler.peak
    torch.manual_seed(0)
    model = BertForSequenceClassification(config)
    shape = ModelShape(
        sum(p.numel() for p in model.parameters()),
        max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()),
        hidden,
        4 * hidden,
        layers,
        heads,
        model.config._attn_implementation,  # eager, as built above: measured with the s^2 term
    )
    ds = {
        "train_micro_batch_size_per_gpu": micros[0],
        "gradient_accumulation_steps": 1,
        precision: {"enabled": True},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-5}},  # as the shipped configs: FusedAdam on GPUs
        "zero_optimization": {
            "stage": stage,
            "reduce_bucket_size": int(5e7),
            "allgather_bucket_size": int(5e7),
            "stage3_prefetch_bucket_size": int(5e7),
        }
        if stage == 2
        else {"stage": 3, "reduce_bucket_size": int(5e7), "stage3_prefetch_bucket_size": int(5e7)},
        "steps_per_print": 10**9,
    }
    engine = build_engine(model, ds)
    del model

    def used() -> int:
        return (torch.cuda.max_memory_allocated() if cuda else max(sampler.peak, anon_rss())) - baseline

    estimate_states, _ = model_state_bytes(shape, "zero2" if stage == 2 else "zero3", 1, 1)
    rows, after_init = [], used()
    for micro in micros:
        batch = collate(fixed_batch(config.vocab_size, micro, seq, seed=0, min_len=seq), engine.device)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        else:
            sampler.reset()
        started = time.perf_counter()
        for _ in range(steps):
            micro_step(engine, batch)
        rows.append(
            {
                "device": device,
                "precision": precision,
                "stage": stage,
                "params": shape.params,
                "micro": micro,
                "seq": seq,
                "measured_after_init": after_init,
                "measured_peak": used(),
                "estimate_states": estimate_states,
                "estimate_activations": activation_bytes(shape, micro, seq),
                "step_s": (time.perf_counter() - started) / steps,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| device | ZeRO | params | micro x seq | measured after init | estimate: model states | measured peak of steps "
        "| estimate: states + activations |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['device']} {r['precision']} | {r['stage']} | {r['params'] / 1e6:.0f}M | {r['micro']} x {r['seq']} "
            f"| {r['measured_after_init'] / GIB:.2f} GiB | {r['estimate_states'] / GIB:.2f} GiB "
            f"| {r['measured_peak'] / GIB:.2f} GiB "
            f"| {(r['estimate_states'] + r['estimate_activations']) / GIB:.2f} GiB |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda")
    p.add_argument("--stages", type=int, nargs="+", default=[2, 3])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--micro", type=int, nargs="+", default=[1, 8])
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--out", default="")
    args = p.parse_args()
    standalone_rank()
    if args.device == "cpu":
        fix_mmap_threshold()  # before the libraries allocate
    dist.init(timeout_minutes=10)
    sampler = AnonPeak() if args.device == "cpu" else None  # one sampling thread for every measurement
    rows = []
    for stage in args.stages:
        rows += measure(args.device, stage, args.hidden, args.layers, args.heads, args.micro, args.seq, args.steps, sampler)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(table(rows))


if __name__ == "__main__":
    main()
