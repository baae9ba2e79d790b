"""The training recipe: config -> data -> model -> engine -> loop -> evaluation -> checkpoint/export.

Launch (2 ranks on this machine, CPU or GPU):
    ./launch.sh
    deepspeed --hostfile hostfiles/localhost --module pipeline train --ds-config ds_configs/small_zero2.json
Every rank runs this file. Rank 0 alone prints, writes metrics and builds caches; collectives
(forward passes in evaluation, loss reduction, checkpoint saves) run on every rank.
"""
from __future__ import annotations

import json
import sys
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import torch

from . import checkpoint, dist
from .config import ConfigError, Hardware, TrainConfig, ds_precision, fill_schedule, load_json, resolve_ds_config
from .data import load_tokenized, make_collate, prepare_splits, steps_per_epoch, train_loader, file_digest
from .engine import build_engine
from .evaluate import evaluate, forward_logits, to_device
from .model import build_model, build_wordpiece_tokenizer, check_model_dir, has_tokenizer, load_tokenizer

PROBE_SIZE = 8  # dev records whose logits the export must reproduce


def new_run_dir(cfg: TrainConfig) -> str:
    """Rank 0 names the run once (the others receive it): never two clocks, never two names."""
    name = cfg.run_name or time.strftime("run-%Y%m%d-%H%M%S")
    run_dir = Path(cfg.output_dir) / name
    if run_dir.exists() and any(run_dir.iterdir()):
        raise ConfigError(f"run directory {run_dir} already exists and is not empty; choose another run_name")
    run_dir.mkdir(parents=True, exist_ok=True)
    return str(run_dir)


def write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, ensure_ascii=False, indent=2), encoding="utf-8")
    tmp.replace(path)


def timed(iterable, stats: dict):
    """Yield from `iterable`, adding the time spent waiting for each item to stats['data_wait']."""
    it = iter(iterable)
    while True:
        start = time.perf_counter()
        try:
            item = next(it)
        except StopIteration:
            return
        stats["data_wait"] += time.perf_counter() - start
        yield item


class RunLog:
    """Rank 0's record of the run: metrics.jsonl, eval JSON files and the console."""

    def __init__(self, run_dir: Path, total_steps: int):
        from tqdm import tqdm

        self.run_dir, self.log = run_dir, dist.get_logger()
        self.bar = tqdm(total=total_steps, desc="train", unit="step", disable=not dist.is_main(), dynamic_ncols=True,
                        mininterval=0.5 if sys.stderr.isatty() else 60)  # a log file gets few bar lines
        if dist.is_main():
            (run_dir / "eval").mkdir(exist_ok=True)
            self.metrics = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")

    def record(self, row: dict) -> None:
        if dist.is_main():
            self.metrics.write(json.dumps(row, ensure_ascii=False) + "\n")
            self.metrics.flush()

    def step(self, row: dict, show: bool) -> None:
        self.record(row)
        self.bar.update(1)
        if show and dist.is_main():
            self.bar.write(f"step {row['step']:>5}  loss {row['loss']:.4f}  lr {row['lr']:.3g}  "
                           f"{row['samples_per_s']:.1f} samples/s  {row['tokens_per_s']:.0f} tokens/s")

    def eval(self, step: int, split: str, metrics: dict) -> None:
        self.record({"step": step, "split": split, **{k: metrics[k] for k in ("accuracy", "macro_f1", "weighted_f1")}})
        if dist.is_main():
            write_json(self.run_dir / "eval" / f"{split}-step-{step}.json", metrics)
            self.bar.write(f"eval {split} @ step {step}: accuracy {metrics['accuracy']:.4f}  "
                           f"macro-F1 {metrics['macro_f1']:.4f}  weighted-F1 {metrics['weighted_f1']:.4f}")

    def close(self) -> None:
        self.bar.close()
        if dist.is_main():
            self.metrics.close()


def train_loop(engine, cfg: TrainConfig, data: dict, collate, label_names, total_steps: int, run: RunLog) -> int:
    """Train until `total_steps` optimizer steps; returns the number done.

    Every micro-batch goes through engine.backward and engine.step; DeepSpeed scales the loss by
    1/accumulation and applies the update at the window's boundary, so the loss is not divided
    here. The logged loss is the mean over the window's micro-batches and over all ranks.
    """
    micro, accum = engine.train_micro_batch_size_per_gpu(), engine.gradient_accumulation_steps()
    world, global_batch = dist.world_size(), engine.train_batch_size()
    step, window = 0, torch.zeros(2, device=engine.device)  # [sum of micro-batch losses, tokens]
    stats, started = {"data_wait": 0.0}, time.perf_counter()
    engine.train()
    for epoch in range(cfg.epochs):
        loader = train_loader(data["train"], collate, micro, accum, world, dist.rank(), cfg.seed, epoch)
        for batch in timed(loader, stats):
            batch = to_device(batch, engine.device)
            loss = engine(**batch).loss
            engine.backward(loss)
            boundary = engine.is_gradient_accumulation_boundary()  # must be asked before step()
            engine.step()
            window += torch.stack([loss.detach().float(), batch["attention_mask"].sum().float()])
            if not boundary:
                continue
            step += 1
            loss_sum, tokens = dist.all_reduce_sum(window).tolist()
            elapsed = time.perf_counter() - started
            run.step({"step": step, "epoch": epoch, "loss": loss_sum / (accum * world), "lr": engine.get_lr()[0],
                      "samples_per_s": global_batch / elapsed, "tokens_per_s": tokens / elapsed,
                      "step_time_s": elapsed, "data_wait_s": stats["data_wait"]}, show=step % cfg.log_every == 0)
            window.zero_()
            if cfg.eval_every and step % cfg.eval_every == 0 and step < total_steps:
                run.eval(step, "dev", evaluate(engine, data["dev"], collate, cfg.eval_batch_size, label_names)[0])
            if cfg.save_every and step % cfg.save_every == 0 and step < total_steps:
                checkpoint.save(engine, run.run_dir, step, {"epoch": epoch, "optimizer_step": step})
            if step == total_steps:
                return step
            stats["data_wait"], started = 0.0, time.perf_counter()
    return step


def quiet_libraries() -> None:
    """Library progress bars (dataset saving, weight loading) would interleave with ours."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.* is deprecated")  # inside DeepSpeed's ZeRO-2


def run(cfg: TrainConfig) -> dict:
    """Train, evaluate, checkpoint and export; returns the final metrics (on every rank)."""
    quiet_libraries()
    log = dist.get_logger()
    hardware = Hardware.detect()
    # Everything checkable without data is checked before the process group starts.
    ds_config = resolve_ds_config(cfg.ds_config, load_json(cfg.ds_config), dist.world_size(), cfg.precision, hardware)
    check_model_dir(cfg.model)
    dist.init(cfg.dist_timeout_minutes)
    torch.manual_seed(cfg.seed)

    run_dir = Path(dist.main_first(lambda: new_run_dir(cfg)))
    cache_dir = cfg.cache_dir or str(Path(cfg.output_dir) / "cache")

    def tokenizer_for(train_split):
        if has_tokenizer(cfg.model):
            return load_tokenizer(cfg.model, cfg.max_length), cfg.model
        tokenizer_dir = build_wordpiece_tokenizer(train_split.texts, file_digest(train_split.path), cache_dir)
        return load_tokenizer(str(tokenizer_dir), cfg.max_length), tokenizer_dir

    info = dist.main_first(lambda: prepare_splits(cfg, tokenizer_for, cache_dir, log))
    tokenizer = load_tokenizer(info["tokenizer_dir"], cfg.max_length)
    data = {name: load_tokenized(path) for name, path in info["splits"].items()}
    label_names, collate = info["label_names"], make_collate(tokenizer)

    per_epoch = steps_per_epoch(len(data["train"]), ds_config["train_batch_size"])
    if per_epoch == 0:
        raise ConfigError(f"{cfg.train_file}: {len(data['train'])} records, fewer than one global batch "
                          f"(train_batch_size={ds_config['train_batch_size']})")
    total_steps = min(per_epoch * cfg.epochs, cfg.max_steps or per_epoch * cfg.epochs)
    ds_config = fill_schedule(cfg.ds_config, ds_config, total_steps, cfg.warmup_ratio)

    model = build_model(cfg.model, label_names, len(tokenizer), ds_config, cfg.seed)
    engine = build_engine(model, ds_config)
    if dist.is_main():
        write_json(run_dir / "train_config.json", asdict(cfg))
        write_json(run_dir / "ds_config.json", {**ds_config, "world_size": dist.world_size()})
    log.info(f"run directory: {run_dir}")
    log.info(f"device: {hardware.name} | world size {dist.world_size()} | ZeRO stage {ds_config['zero_optimization']['stage']} "
             f"| precision {ds_precision(ds_config)}")
    log.info(f"batch: {ds_config['train_micro_batch_size_per_gpu']} per rank x {ds_config['gradient_accumulation_steps']} "
             f"accumulation x {dist.world_size()} ranks = {ds_config['train_batch_size']} per optimizer step; "
             f"{per_epoch} steps per epoch ({len(data['train']) % ds_config['train_batch_size']} records left out each epoch), "
             f"{total_steps} steps in all")

    runlog = RunLog(run_dir, total_steps)
    steps = train_loop(engine, cfg, data, collate, label_names, total_steps, runlog)

    results = {}
    for split in [name for name in ("dev", "test") if name in data]:
        results[split], predictions = evaluate(engine, data[split], collate, cfg.eval_batch_size, label_names)
        runlog.eval(steps, split, results[split])
        if dist.is_main():
            (run_dir / f"predictions-{split}.jsonl").write_text(
                "".join(json.dumps({"label": label_names[p]}, ensure_ascii=False) + "\n" for p in predictions), encoding="utf-8")
    runlog.close()
    if dist.is_main():
        write_json(run_dir / "eval_results.json", {"step": steps, **results})

    checkpoint_dir = checkpoint.save(engine, run_dir, steps, {"epoch": cfg.epochs, "optimizer_step": steps})
    probe = collate([data["dev"][i] for i in range(min(PROBE_SIZE, len(data["dev"])))])
    engine.eval()
    live_logits = forward_logits(engine, probe)  # every rank: a ZeRO-3 forward is collective
    verify = checkpoint.verify_against_live(probe, live_logits, ds_precision(ds_config))
    export_dir = dist.main_first(lambda: checkpoint.write_export(checkpoint_dir, engine.module.config, tokenizer,
                                                                  run_dir / "export", verify))
    log.info(f"final dev: accuracy {results['dev']['accuracy']:.4f}  macro-F1 {results['dev']['macro_f1']:.4f}  "
             f"weighted-F1 {results['dev']['weighted_f1']:.4f}")
    log.info(f"checkpoint: {checkpoint_dir}\nexport (verified): {export_dir}\nmetrics: {run_dir / 'metrics.jsonl'}\n"
             f"eval results: {run_dir / 'eval_results.json'}")
    return results
