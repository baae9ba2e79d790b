"""`python -m pipeline bench`: this pipeline against a minimal DeepSpeed loop and HF Trainer.

The same model (random init from one seed), tokenized data and resolved DeepSpeed JSON go through
three stacks, each as its own job under the real `deepspeed` launcher:

- `pipeline`: `python -m pipeline train` as users run it (`train.run`, whose loop steps through
  `train.micro_step`), read back from its metrics.jsonl and TensorBoard events;
- `reference`: the minimal hand-written loop below (DataLoader + DistributedSampler,
  `engine(**batch)`, `engine.backward`, `engine.step`), the yardstick;
- `hf`: `transformers.Trainer` with `deepspeed=` the same JSON (`use_cpu=True` on CPU ranks, else
  transformers takes the world size as 1 and DeepSpeed's batch assertion fails).

- `pipeline-grouped` and `hf-grouped`: the same two with batches grouped by length (the
  pipeline's `--group-by-length 1`; HF's `train_sampling_strategy="group_by_length"`).

The reference and HF stacks are the baselines the pipeline is compared with, so they keep their
own loops on purpose: they must not share the pipeline's code.

Each (ZeRO stage, accumulation) combination runs every stack once per repetition, the stacks'
order rotating between repetitions and combinations, so that a slow spell of a shared machine hits
all stacks alike; the summary takes medians over repetitions. Per run: the median optimizer-step
time after `warmup` steps (samples/s and tokens/s follow from it), the share of step time spent
waiting for the next batch, the time from launch to the end of the first optimizer step, and each
rank's peak RSS (CPU) or peak allocated accelerator memory, and the padding efficiency (real tokens
over the tokens of the padded batches, all ranks).
"""

from __future__ import annotations

import json
import math
import os
import resource
import statistics
import time
from pathlib import Path

from ..core.base import load_json
from ..core.dist import release_shared_memory
from ..core.ds_config import Hardware, fill_schedule, resolve_ds_config, warmup_steps
from ..core.options import SAMPLE_DATA_DIR, TINY_MODEL_DIR, TrainConfig
from ..tasks.single_label import SINGLE_LABEL
from .common import launch_module, run_worker, sweep_config

STACKS = ("pipeline", "reference", "hf", "pipeline-grouped", "hf-grouped")
BASELINES = ("reference", "hf", "hf-grouped")  # what each stack's samples/s is compared with
QUICK = {"stages": [2], "accum": [1, 4], "reps": 1, "steps": 6, "warmup": 2, "min_micro_batches": 0}


# ----------------------------------------------------------------------------------------------
# Statistics and reporting (pure functions, unit-tested)
# ----------------------------------------------------------------------------------------------


def steady_state(steps: list[dict], warmup: int, global_batch: int) -> dict:
    """Summary of one run from its per-optimizer-step records {time, wait, tokens[, padded]} after `warmup`."""
    kept = steps[warmup:]
    if not kept:
        raise ValueError(f"{len(steps)} steps recorded, none left after {warmup} warm-up steps")
    step_time = statistics.median(s["time"] for s in kept)
    summary = {
        "step_time_s": step_time,
        "samples_per_s": global_batch / step_time,
        "tokens_per_s": statistics.mean(s["tokens"] for s in kept) / step_time,
        "data_wait_pct": 100 * sum(s["wait"] for s in kept) / sum(s["time"] for s in kept),
    }
    if all("padded" in s for s in kept):
        summary["padding_efficiency"] = sum(s["tokens"] for s in kept) / sum(s["padded"] for s in kept)
    return summary


def paired_ratio(reps: list[dict], stack: str, other: str) -> dict:
    """`stack`'s samples/s over `other`'s, paired within each repetition (the two ran minutes apart, so
    a slow spell of the machine hits both): the median ratio and a distribution-free confidence
    interval for it of at least 95% (order statistics of the sign test; none from fewer than 6 pairs).
    The median, not the mean: a spell that starts between two runs of a pair makes an outlier pair."""
    from scipy.stats import binom

    ratios = sorted(rep[stack]["samples_per_s"] / rep[other]["samples_per_s"] for rep in reps)
    n = len(ratios)
    k = int(binom.ppf(0.025, n, 0.5))  # the k-th smallest and k-th largest ratio bound the median
    low, high = (ratios[k - 1], ratios[n - k]) if k >= 1 else (math.nan, math.nan)
    return {"ratio": statistics.median(ratios), "low": low, "high": high, "pairs": n}


def verdict(ratio: dict, target: float) -> str:
    """A goal 'ratio >= target' is met or missed only when the whole confidence interval says so
    (comparisons with NaN, no interval, are false)."""
    if ratio["low"] >= target:
        return "met"
    if ratio["high"] < target:
        return "MISSED"
    return "not settled"


def aggregate(reps: list[dict]) -> dict:
    """Medians over repetitions; `reps` is [{stack: summary}], one dict per repetition. Ratios to the
    reference and to HF Trainer are paired within each repetition (`paired_ratio`)."""
    out = {}
    for stack in reps[0]:
        runs = [rep[stack] for rep in reps]
        out[stack] = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
        for other in BASELINES:
            if other in reps[0]:
                out[stack][f"vs_{other}"] = paired_ratio(reps, stack, other)
        out[stack]["spread_pct"] = 100 * (max(r["samples_per_s"] for r in runs) / min(r["samples_per_s"] for r in runs) - 1)
    return out


COLUMNS = [
    ("samples/s", "samples_per_s", "{:.1f}"),
    ("tokens/s", "tokens_per_s", "{:.0f}"),
    ("step ms", "step_time_s", "{:.0f}", 1000),
    ("× reference", "vs_reference", "{:.3f}"),
    ("padding eff.", "padding_efficiency", "{:.2f}"),
    ("spread %", "spread_pct", "{:.1f}"),
    ("start-up s", "startup_s", "{:.1f}"),
    ("data wait %", "data_wait_pct", "{:.2f}"),
    ("peak MiB/rank", "peak_mib", "{:.0f}"),
]


def markdown_table(results: dict) -> str:
    """results: {(stage, accum): {stack: aggregated}} -> one markdown row per (stage, accum, stack)."""
    lines = ["| ZeRO | accum | stack | " + " | ".join(c[0] for c in COLUMNS) + " |", "| --- " * (3 + len(COLUMNS)) + "|"]
    for (stage, accum), stacks in sorted(results.items()):
        for stack, row in stacks.items():
            values = [row.get(c[1], math.nan) for c in COLUMNS]
            values = [v["ratio"] if isinstance(v, dict) else v for v in values]
            cells = [c[2].format(v * (c[3] if len(c) > 3 else 1)) for c, v in zip(COLUMNS, values)]
            lines.append(f"| {stage} | {accum} | {stack} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def describe(ratio: dict, name: str, target: float) -> str:
    interval = (
        f"95% CI {ratio['low']:.3f}–{ratio['high']:.3f}"
        if not math.isnan(ratio["low"])
        else f"too few pairs ({ratio['pairs']}) for a 95% CI"
    )
    goal = f"≥ {target:g}× {name}" if target != 1 else f"≥ {name}"
    return f"{ratio['ratio']:.3f}× {name} ({interval}): {goal} {verdict(ratio, target)}"


def goals(results: dict, pooled: dict) -> list[str]:
    """The benchmark's goals: one line per combination, then the ratios pooled over all of them
    (`pooled`: {other stack: paired_ratio over every repetition of every combination})."""
    targets = {"reference": (0.97, "reference"), "hf": (1.0, "HF Trainer")}
    lines = []
    for (stage, accum), s in sorted(results.items()):
        p = s["pipeline"]
        parts = [describe(p[f"vs_{other}"], name, target) for other, (target, name) in targets.items() if f"vs_{other}" in p]
        lines.append(
            f"ZeRO-{stage} accum {accum}: pipeline "
            + "; ".join(parts)
            + f"; data wait {p['data_wait_pct']:.2f}%: < 2% {'met' if p['data_wait_pct'] < 2 else 'MISSED'}"
        )
    parts = [describe(pooled[other], name, target) for other, (target, name) in targets.items() if other in pooled]
    lines.append(f"All combinations, {next(iter(pooled.values()))['pairs']} paired runs: pipeline " + "; ".join(parts))
    return lines


def plot(results: dict, output: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = sorted({stage for stage, _ in results})
    fig, axes = plt.subplots(1, len(stages), figsize=(4.5 * len(stages), 4), squeeze=False, sharey=True)
    for ax, stage in zip(axes[0], stages):
        combos = sorted(a for s, a in results if s == stage)
        for stack in results[stage, combos[0]]:
            ax.plot(combos, [results[stage, a][stack]["samples_per_s"] for a in combos], marker="o", label=stack)
        ax.set_xscale("log", base=2)
        ax.set_xticks(combos, [str(a) for a in combos])
        ax.set_title(f"ZeRO-{stage}")
        ax.set_xlabel("gradient accumulation steps")
    axes[0][0].set_ylabel("samples/s (median of repetitions)")
    axes[0][0].legend()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(output, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# The three stacks (each runs on every rank of a launched job)
# ----------------------------------------------------------------------------------------------


def peak_memory_mib() -> float:
    import torch

    if torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR") != "cpu":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def global_counts(steps: list[dict]) -> list[dict]:
    """This rank's real and padded tokens per step, summed over ranks."""
    import torch
    import torch.distributed as td

    total = torch.tensor([[s["tokens"], s["padded"]] for s in steps], dtype=torch.float64)
    td.all_reduce(total)
    return [{**s, "tokens": t, "padded": p} for s, (t, p) in zip(steps, total.tolist())]


def run_pipeline(spec: dict, ds: dict) -> tuple[list[dict], float]:
    from ..core import dist
    from ..train.run import run

    cfg = TrainConfig(
        ds_config=spec["ds_path"],
        train_file=spec["train_file"],
        dev_file=spec["dev_file"],
        model=spec["model"],
        max_length=spec["max_length"],
        epochs=1000,
        max_steps=spec["steps"],
        seed=spec["seed"],
        eval_every=0,
        log_every=spec["steps"],
        output_dir=spec["out"],
        run_name=spec["name"],
        cache_dir=spec["cache_dir"],
        group_by_length=int(spec["stack"] == "pipeline-grouped"),
    )
    run(cfg)
    if not dist.is_main():
        return [], 0.0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = Path(spec["out"]) / spec["name"]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [
        {
            "time": r["step_time_s"],
            "wait": r["data_wait_s"],
            "tokens": r["tokens_per_s"] * r["step_time_s"],
            "padded": r["tokens_per_s"] * r["step_time_s"] / r["padding_efficiency"],
        }
        for r in rows
        if "lr" in r  # training rows (evaluation rows carry a loss too)
    ]
    first = EventAccumulator(str(run_dir / "tensorboard")).Reload().Scalars("train/loss")[0].wall_time
    return steps, first


def load_data(spec: dict):
    from transformers import AutoTokenizer, DataCollatorWithPadding

    from ..data.cache import load_tokenized
    from ..tasks.single_label import encode

    tokenizer = AutoTokenizer.from_pretrained(spec["tokenizer"])
    data = load_tokenized(spec["train_data"])
    ids = encode(data.data.column("labels"), spec["label_names"])  # the cache keeps labels as written
    data = data.remove_columns("labels").add_column("labels", ids.tolist())
    return data, tokenizer, DataCollatorWithPadding(tokenizer, return_tensors="pt")


def run_reference(spec: dict, ds: dict) -> tuple[list[dict], float]:
    """The yardstick: the least a DeepSpeed training loop must do (a baseline: written out here on
    purpose, not through `train.micro_step`)."""
    import deepspeed
    from torch.utils.data import DataLoader, DistributedSampler

    from ..train.model import build_model

    deepspeed.init_distributed()
    release_shared_memory()
    data, tokenizer, collate = load_data(spec)
    model = build_model(spec["model"], spec["label_names"], len(tokenizer), ds, spec["seed"])
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds)
    sampler = DistributedSampler(data, seed=spec["seed"], drop_last=True)
    loader = DataLoader(
        data, batch_size=engine.train_micro_batch_size_per_gpu(), sampler=sampler, collate_fn=collate, drop_last=True
    )
    steps, first, epoch = [], 0.0, 0
    engine.train()
    start, wait, tokens, padded = time.perf_counter(), 0.0, 0, 0
    while len(steps) < spec["steps"]:
        sampler.set_epoch(epoch)
        batches, epoch = iter(loader), epoch + 1
        while len(steps) < spec["steps"]:
            t = time.perf_counter()
            batch = next(batches, None)
            if batch is None:
                break
            wait += time.perf_counter() - t
            batch = {k: v.to(engine.device) for k, v in batch.items()}
            engine.backward(engine(**batch).loss)
            boundary = engine.is_gradient_accumulation_boundary()
            engine.step()
            tokens += int(batch["attention_mask"].sum())
            padded += batch["attention_mask"].numel()
            if boundary:
                steps.append({"time": time.perf_counter() - start, "wait": wait, "tokens": tokens, "padded": padded})
                first = first or time.time()
                start, wait, tokens, padded = time.perf_counter(), 0.0, 0, 0
    return global_counts(steps), first


def run_hf(spec: dict, ds: dict) -> tuple[list[dict], float]:
    """HF Trainer with the same JSON; its arguments mirror the JSON's values, as its integration requires."""
    import deepspeed
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from ..train.model import build_model

    deepspeed.init_distributed()  # ZeRO-3 partitions while building: the process group must exist
    release_shared_memory()
    data, tokenizer, collate = load_data(spec)
    # Built before TrainingArguments: build_model switches transformers' ZeRO-3 integration off when done.
    model = build_model(spec["model"], spec["label_names"], len(tokenizer), ds, spec["seed"])
    opt, sched = ds["optimizer"]["params"], (ds.get("scheduler") or {}).get("params", {})
    args = TrainingArguments(
        output_dir=str(Path(spec["out"]) / spec["name"]),
        per_device_train_batch_size=ds["train_micro_batch_size_per_gpu"],
        gradient_accumulation_steps=ds["gradient_accumulation_steps"],
        max_steps=spec["steps"],
        learning_rate=opt["lr"],
        weight_decay=opt.get("weight_decay", 0.0),
        adam_beta1=opt.get("betas", [0.9, 0.999])[0],
        adam_beta2=opt.get("betas", [0.9, 0.999])[1],
        adam_epsilon=opt.get("eps", 1e-8),
        max_grad_norm=ds.get("gradient_clipping", 1.0),
        warmup_steps=sched.get("warmup_num_steps", 0),
        deepspeed=ds,
        use_cpu=Hardware.detect().device == "cpu",
        seed=spec["seed"],
        logging_strategy="no",
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_drop_last=True,
        train_sampling_strategy="group_by_length" if spec["stack"] == "hf-grouped" else "random",
    )
    steps, clock = [], {"start": 0.0, "first": 0.0}

    class Timed(Trainer):
        def get_batch_samples(self, epoch_iterator, num_batches, device):
            t = time.perf_counter()
            batches, count = super().get_batch_samples(epoch_iterator, num_batches, device)
            masks = [b["attention_mask"] for b in batches]
            steps.append(
                {
                    "wait": time.perf_counter() - t,
                    "tokens": sum(int(m.sum()) for m in masks),
                    "padded": sum(m.numel() for m in masks),
                }
            )
            return batches, count

    class StepTimes(TrainerCallback):
        def on_train_begin(self, *_, **__):
            clock["start"] = time.perf_counter()

        def on_step_end(self, *_, **__):
            steps[-1]["time"] = time.perf_counter() - clock["start"]
            clock["first"] = clock["first"] or time.time()
            clock["start"] = time.perf_counter()

    Timed(model=model, args=args, train_dataset=data, data_collator=collate, callbacks=[StepTimes()]).train()
    steps = [s for s in steps if "time" in s]  # a last call that found the data exhausted did not train
    return global_counts(steps), clock["first"]


def worker(spec_path: str) -> None:
    from ..core import dist

    spec = json.loads(Path(spec_path).read_text())
    ds = load_json(spec["ds_path"])
    run_stack = {"pipeline": run_pipeline, "reference": run_reference, "hf": run_hf}[spec["stack"].removesuffix("-grouped")]
    steps, first = run_stack(spec, ds)
    memory = dist.all_gather_objects(peak_memory_mib())
    if dist.is_main():
        Path(spec["result"]).write_text(
            json.dumps({"steps": steps, "startup_s": first - float(os.environ["BENCH_LAUNCH_TIME"]), "peak_mib": max(memory)})
        )
    dist.shutdown()


# ----------------------------------------------------------------------------------------------
# The driver
# ----------------------------------------------------------------------------------------------


def launch(spec: dict, out: Path, ranks: int) -> dict:
    """One stack on one combination, as its own job; returns rank 0's record."""
    spec_path = out / f"{spec['name']}.spec.json"
    spec_path.write_text(json.dumps(spec))
    Path(spec["result"]).unlink(missing_ok=True)
    try:
        launch_module("pipeline.tools.bench", ["--worker", str(spec_path)], ranks, env={"BENCH_LAUNCH_TIME": repr(time.time())})
    except RuntimeError as e:
        # Seen now and then on CPU ranks: a rank aborts in a library thread's teardown after the
        # process group is destroyed. The measurement was complete by then (its file is written last).
        if not (Path(spec["result"]).is_file() and "terminate called without an active exception" in str(e)):
            raise
        print(f"warning: {spec['name']}: a rank aborted while exiting, after its results were written", flush=True)
    return json.loads(Path(spec["result"]).read_text())


def prepare(args, out: Path) -> dict:
    """The data every stack shares: a dev file for the pipeline's final evaluation, and the tokenizer
    and tokenized training set that a first, unmeasured pipeline run builds into the cache (that run
    also warms the file cache and DeepSpeed's JIT-built ops for all that follow)."""
    from ..data.cache import read_split

    dev = out / "dev.jsonl"
    dev.write_text(
        "".join((SAMPLE_DATA_DIR / "dev.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)[:32]), encoding="utf-8"
    )
    common = {
        "train_file": args.train_file,
        "dev_file": str(dev),
        "model": args.model,
        "max_length": args.max_length,
        "seed": args.seed,
        "out": str(out),
        "cache_dir": str(out / "cache"),
        "label_names": sorted(set(read_split(args.train_file, "text", "label", SINGLE_LABEL).labels)),
    }
    ds_path = write_config(args, out, 2, 1)
    launch(
        {**common, "stack": "pipeline", "name": "warm-up", "steps": 2, "ds_path": ds_path, "result": str(out / "warm-up.json")},
        out,
        args.ranks,
    )
    patterns = (f"tokenized-{Path(args.train_file).stem}-*", "tokenizer-*")
    (tokenized,), (tokenizer,) = (sorted((out / "cache").glob(p)) for p in patterns)
    return {**common, "train_data": str(tokenized), "tokenizer": str(tokenizer)}


def steps_per_run(args, accum: int) -> int:
    """At least `--steps`, and enough that the measured steps span `--min-micro-batches` micro-batches:
    with little accumulation a step is short, and a few short steps measure the machine's noise."""
    return max(args.steps, args.warmup + math.ceil(args.min_micro_batches / accum))


def write_config(args, out: Path, stage: int, accum: int) -> str:
    """The resolved JSON every stack gets for this combination: numbers only, scheduler filled."""
    raw = sweep_config(load_json(args.ds_config), stage, accum, args.micro_batch)
    ds = resolve_ds_config(args.ds_config, raw, args.ranks, Hardware.detect(), TrainConfig()).ds
    total_steps = steps_per_run(args, accum)
    ds = fill_schedule(args.ds_config, ds, total_steps, warmup_steps(TrainConfig(), total_steps))
    path = out / f"ds-zero{stage}-accum{accum}.json"
    path.write_text(json.dumps(ds, indent=1))
    return str(path)


def run_bench(args) -> tuple[dict, dict]:
    """{(stage, accum): aggregated results}, and the pipeline's ratios pooled over every repetition."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    common = prepare(args, out)
    combos = [(stage, accum) for stage in args.stages for accum in args.accum]
    configs = {c: write_config(args, out, *c) for c in combos}
    raw = {c: [] for c in combos}
    for rep in range(args.reps):
        for i, combo in enumerate(combos):
            shift = rep + i  # rotate the stacks' order: none always runs first or last
            order = args.stacks[shift % len(args.stacks) :] + args.stacks[: shift % len(args.stacks)]
            summaries = {}
            for stack in order:
                name = f"{stack}-zero{combo[0]}-accum{combo[1]}-rep{rep}"
                record = launch(
                    {
                        **common,
                        "stack": stack,
                        "name": name,
                        "steps": steps_per_run(args, combo[1]),
                        "ds_path": configs[combo],
                        "result": str(out / f"{name}.json"),
                    },
                    out,
                    args.ranks,
                )
                global_batch = load_json(configs[combo])["train_batch_size"]
                summaries[stack] = {
                    **steady_state(record["steps"], args.warmup, global_batch),
                    "startup_s": record["startup_s"],
                    "peak_mib": record["peak_mib"],
                }
                print(
                    f"rep {rep} ZeRO-{combo[0]} accum {combo[1]} {stack}: {summaries[stack]['samples_per_s']:.1f} samples/s",
                    flush=True,
                )
            raw[combo].append({s: summaries[s] for s in args.stacks})
    results = {c: aggregate(reps) for c, reps in raw.items()}
    every_rep = [rep for reps in raw.values() for rep in reps]
    pooled = {other: paired_ratio(every_rep, "pipeline", other) for other in ("reference", "hf") if other in args.stacks}
    combinations = [{"stage": s, "accum": a, "reps": raw[s, a], "summary": results[s, a]} for s, a in combos]
    (out / "bench.json").write_text(json.dumps({"combinations": combinations, "pooled": pooled}, indent=1))
    return results, pooled


def add_arguments(p) -> None:
    p.add_argument(
        "--ds-config", default="ds_configs/small_zero2.json", help="base config; ZeRO stage and accumulation are swept"
    )
    p.add_argument("--stages", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--accum", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--reps", type=int, default=3, help="repetitions of every (stack, stage, accumulation) run")
    p.add_argument("--steps", type=int, default=12, help="optimizer steps per run, at least")
    p.add_argument(
        "--min-micro-batches",
        type=int,
        default=48,
        help="more steps where needed, so that the steps after warm-up span this many micro-batches",
    )
    p.add_argument("--warmup", type=int, default=3, help="first steps left out of the steady state")
    p.add_argument("--micro-batch", type=int, default=8, help="records per micro-batch on each rank")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument(
        "--stacks", nargs="+", choices=STACKS, default=list(STACKS), help="stacks to run (pipeline first); default: all"
    )
    p.add_argument("--model", default=str(TINY_MODEL_DIR))
    p.add_argument("--train-file", default=str(SAMPLE_DATA_DIR / "train.jsonl"))
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--out", default="runs/bench", help="directory for runs, bench.md, bench.png and bench.json")
    p.add_argument("--quick", action="store_true", help="smoke: ZeRO-2, accumulation 1 and 4, 1 repetition, 6 steps")


def main(args) -> int:
    if args.quick:
        vars(args).update(QUICK)
    results, pooled = run_bench(args)
    hardware = Hardware.detect()
    machine = f"{args.ranks} ranks on {hardware.name}, {os.cpu_count()} CPU cores"
    out = Path(args.out)
    text = (
        f"{machine}; optimizer steps per run: max({args.steps}, {args.warmup} + {args.min_micro_batches} / accumulation), "
        f"median step time after {args.warmup} warm-up steps, median of {args.reps} alternating repetitions; "
        f"ratios: median of the ratios within each repetition, with a 95% confidence interval\n\n"
        + markdown_table(results)
        + "\n"
        + "\n".join("- " + line for line in goals(results, pooled))
        + "\n"
    )
    (out / "bench.md").write_text(text, encoding="utf-8")
    plot(results, out / "bench.png", f"{machine}; model {Path(args.model).name}, max length {args.max_length}")
    print(text + f"\nwritten: {out / 'bench.md'}, {out / 'bench.png'}, {out / 'bench.json'}")
    return 0


if __name__ == "__main__":  # a rank of a launched job
    run_worker(worker)
