"""`python -m pipeline comms`: collectives per optimizer step, by kind, for each ZeRO stage and
accumulation count, measured with DeepSpeed's communication logger on real ranks.

The driver launches one job (`deepspeed --num_gpus RANKS --module pipeline.tools.comms --worker SPEC`);
its ranks train each (stage, accumulation) combination in turn for a few optimizer steps through the
pipeline's own micro-step (`train.micro_step`), with
`"comms_logger": {"enabled": true, "prof_all": true}` in the config. The logger's record is taken
after every optimizer step; the per-step counts and bytes are the difference between two records,
so the engine's start-up (parameter broadcast, ZeRO-3 partitioning) is not counted. Only collectives
issued through `deepspeed.comm` are seen: the pipeline's own one all-reduce of the logged loss per
optimizer step (8 bytes, `torch.distributed` directly) is not in the table.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from ..core.base import load_json
from ..core.ds_config import Hardware, resolve_ds_config
from ..core.options import TINY_MODEL_DIR, TrainConfig
from .common import LABELS, collate, fixed_batch, launch_module, run_worker, sweep_config


def snapshot() -> dict:
    """{kind: (calls, bytes)} so far, from the comms logger's {name: {message size: [count, ...]}}."""
    import deepspeed.comm as dist

    raw = dist.comms_logger.get_raw_data()
    return {
        name: (sum(v[0] for v in sizes.values()), sum(size * v[0] for size, v in sizes.items())) for name, sizes in raw.items()
    }


def per_step(before: dict, after: dict) -> dict:
    return {
        k: (after[k][0] - before.get(k, (0, 0))[0], after[k][1] - before.get(k, (0, 0))[1])
        for k in after
        if after[k] != before.get(k)
    }


def measure(spec: dict, stage: int, accum: int) -> list[dict]:
    """Train `spec['steps']` optimizer steps; the collectives of each, by kind."""
    from transformers import AutoConfig

    from ..core import dist
    from ..train.loop import micro_step
    from ..train.model import build_engine, build_model

    base = load_json(spec["ds_config"])
    raw = {
        **sweep_config(base, stage, accum, spec["micro"]),
        "comms_logger": {"enabled": True, "prof_all": True, "verbose": False},
    }
    ds = resolve_ds_config(
        spec["ds_config"],
        {k: v for k, v in raw.items() if k != "scheduler"},
        dist.world_size(),
        Hardware.detect(),
        TrainConfig(lr_scheduler_type="constant"),
    ).ds
    micro = ds["train_micro_batch_size_per_gpu"]
    vocab = AutoConfig.from_pretrained(spec["model"]).vocab_size
    engine = build_engine(build_model(spec["model"], LABELS, vocab, ds, seed=0), ds)
    records = fixed_batch(vocab, micro * accum * spec["steps"], spec["seq_len"], seed=dist.rank())
    steps, last = [], snapshot()
    for start in range(0, len(records), micro):
        _, boundary = micro_step(engine, collate(records[start : start + micro], engine.device))
        if boundary:
            now = snapshot()
            steps.append(per_step(last, now))
            last = now
    engine.destroy()
    return steps


def worker(spec_path: str) -> None:
    from ..core import dist

    spec = json.loads(Path(spec_path).read_text())
    dist.init(timeout_minutes=10)
    results = [{"stage": s, "accum": a, "steps": measure(spec, s, a)} for s in spec["stages"] for a in spec["accum"]]
    if dist.is_main():
        Path(spec["output"]).write_text(json.dumps(results, indent=1))
    dist.shutdown()


def measure_all(
    ds_config: str,
    stages,
    accum,
    ranks: int = 2,
    steps: int = 2,
    model: str = str(TINY_MODEL_DIR),
    seq_len: int = 64,
    micro: int = 8,
) -> list[dict]:
    """One launch measuring every (stage, accumulation); [{stage, accum, steps: [{kind: (calls, bytes)}]}]."""
    with tempfile.TemporaryDirectory() as tmp:
        spec = {
            "ds_config": str(Path(ds_config).resolve()),
            "stages": list(stages),
            "accum": list(accum),
            "steps": steps,
            "micro": micro,
            "model": model,
            "seq_len": seq_len,
            "output": str(Path(tmp) / "comms.json"),
        }
        (Path(tmp) / "spec.json").write_text(json.dumps(spec))
        launch_module("pipeline.tools.comms", ["--worker", str(Path(tmp) / "spec.json")], ranks)
        results = json.loads(Path(spec["output"]).read_text())
    for r in results:  # JSON turned the (calls, bytes) tuples into lists
        r["steps"] = [{k: tuple(v) for k, v in step.items()} for step in r["steps"]]
    return results


def steady(result: dict) -> dict:
    """The last optimizer step's collectives (the first may include one-off work)."""
    return result["steps"][-1]


def markdown(results: list[dict], ranks: int) -> str:
    kinds = sorted({k for r in results for k in steady(r)})
    lines = [
        "| ZeRO stage | accumulation | " + " | ".join(f"{k}: calls, MB" for k in kinds) + " |",
        "| --- | --- |" + " --- |" * len(kinds),
    ]
    for r in results:
        step = steady(r)
        cells = [f"{step[k][0]}, {step[k][1] / 1e6:.2f}" if k in step else "0" for k in kinds]
        lines.append(f"| {r['stage']} | {r['accum']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + f"\n\nPer optimizer step, per rank ({ranks} ranks); MB = 10^6 bytes sent by each call's input.\n"


def add_arguments(p) -> None:
    p.add_argument("--ds-config", default="ds_configs/small_zero2.json", help="base config; stage and accumulation are swept")
    p.add_argument("--stages", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--accum", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--steps", type=int, default=3, help="optimizer steps per combination (the last one is reported)")
    p.add_argument("--model", default=str(TINY_MODEL_DIR))
    p.add_argument("--output", help="also write the markdown table here")


def main(args) -> int:
    results = measure_all(args.ds_config, args.stages, args.accum, args.ranks, args.steps, args.model)
    table = markdown(results, args.ranks)
    print(table)
    if args.output:
        Path(args.output).write_text(table, encoding="utf-8")
    return 0


if __name__ == "__main__":  # a rank of the launched job
    run_worker(worker)
