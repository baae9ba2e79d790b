"""What the tools share: a process group outside the launcher, a job under the real launcher, the
swept configs, and seeded synthetic batches."""

from __future__ import annotations

import argparse
import os
import subprocess
from pathlib import Path

from ..core.base import free_port
from ..core.ds_config import Hardware

REPO = Path(__file__).resolve().parents[2]
LABELS = ["a", "b"]


def standalone_rank() -> None:
    """Outside the launcher, this process is the only rank of its own process group."""
    if "RANK" not in os.environ and "OMPI_COMM_WORLD_RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))


def launch_module(module: str, args: list[str], ranks: int, env: dict | None = None, timeout: int = 900):
    """Run `module` on `ranks` ranks with the real deepspeed launcher (CPU ranks without a GPU)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    if Hardware.detect().device == "cpu":
        env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"))
    cmd = ["deepspeed", "--num_gpus", str(ranks), "--master_port", str(free_port()), "--module", module, *args]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def run_worker(worker) -> None:
    """A launched rank's entry point: `--worker SPEC_JSON` (the launcher appends --local_rank=N)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", required=True)
    parser.add_argument("--local_rank", type=int)
    worker(parser.parse_args().worker)


def sweep_config(base: dict, stage: int, accum: int, micro: int) -> dict:
    """`base` with ZeRO `stage`, `micro` records per micro-batch and `accum` accumulation steps; the
    global batch follows the world size (the shipped configs state a global batch instead)."""
    ds = {k: v for k, v in base.items() if k != "train_batch_size"}
    ds["train_micro_batch_size_per_gpu"] = micro
    ds["gradient_accumulation_steps"] = accum
    ds["zero_optimization"] = {**base.get("zero_optimization", {}), "stage": stage}
    return ds


def fixed_batch(vocab_size: int, records: int, seq_len: int, seed: int, min_len: int | None = None) -> list[dict]:
    """Seeded records of random tokens and labels (of `LABELS`), each `min_len` (default half of
    `seq_len`) to `seq_len` tokens long, so that padding differs between batch layouts."""
    import torch

    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(seq_len // 2 if min_len is None else min_len, seq_len + 1, (records,), generator=g)
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
