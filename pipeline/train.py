"""The training recipe: config -> data -> model -> engine -> loop -> evaluation -> checkpoint/export.

Launch (2 ranks on this machine, CPU or GPU):
    ./launch.sh
    deepspeed --hostfile hostfiles/localhost --module pipeline train --ds-config ds_configs/small_zero2.json
Every rank runs this file. Rank 0 alone prints, writes metrics and builds caches; collectives
(forward passes in evaluation, loss reduction, checkpoint saves) run on every rank.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import torch

from . import checkpoint, dist, task
from .base import ConfigError, load_json, write_json, write_text
from .checkpoint import TrainerState
from .config import TrainConfig
from .data import TokenizedSplit, prepare_splits, train_batches
from .ds_config import Hardware, RunShape, ds_precision, resolve_ds_config
from .engine import build_engine
from .evaluate import evaluate, to_device
from .model import build_model, check_model_dir, load_tokenizer, tokenizer_source
from .reading import Reading
from .stop import Stopped, StopRequests

PROBE_SIZE = 8  # dev records whose logits the export must reproduce


def new_run_dir(cfg: TrainConfig) -> str:
    """Rank 0 names the run once (the others receive it): never two clocks, never two names.

    An existing run directory is only reused by `--resume if-present` (a retried job whose first
    attempt died before its first checkpoint); otherwise it is an error, so no run is overwritten.
    """
    name = cfg.run_name or time.strftime("run-%Y%m%d-%H%M%S")
    run_dir = Path(cfg.output_dir) / name
    if run_dir.exists() and any(run_dir.iterdir()) and cfg.resume != "if-present":
        raise ConfigError(f"run directory {run_dir} already exists and is not empty; choose another run_name")
    run_dir.mkdir(parents=True, exist_ok=True)
    return str(run_dir)


def metrics_up_to(path: Path, step: int, log) -> list[str]:
    """The lines of metrics.jsonl for steps up to `step`.

    A last line that is cut short (the run was killed, or the disk filled, while writing it) is
    dropped with a warning; an unreadable line anywhere else is an error naming it.
    """
    if not path.exists():
        return []
    lines = path.read_bytes().splitlines()
    kept = []
    for number, raw in enumerate(lines, start=1):
        try:
            row = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            if number < len(lines):
                raise ConfigError(f"{path}: line {number} is not a JSON metrics record; repair or remove that line") from None
            log.warning(f"{path}: dropped its incomplete last line (cut short when the run was interrupted)")
            break
        if row["step"] <= step:
            kept.append(raw.decode("utf-8") + "\n")
    return kept


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
    """Rank 0's record of the run: metrics.jsonl, TensorBoard events, eval JSON files and the console."""

    def __init__(
        self, run_dir: Path, total_steps: int, start_step: int, tensorboard: bool = False, kind: task.Task = task.SINGLE_LABEL
    ):
        from tqdm import tqdm

        self.run_dir, self.log, self.kind = run_dir, dist.get_logger(), kind
        self.bar = tqdm(
            total=total_steps,
            initial=start_step,
            desc="train",
            unit="step",
            disable=not dist.is_main(),
            dynamic_ncols=True,
            mininterval=0.5 if sys.stderr.isatty() else 60,
        )  # a log file gets few bar lines
        path = run_dir / "metrics.jsonl"
        # A resumed run drops what the interrupted one logged after its checkpoint: the file then
        # reads as one uninterrupted run. On rank 0 alone, but a failure reaches every rank.
        dist.main_first(lambda: write_text(path, "".join(metrics_up_to(path, start_step, self.log))))
        if dist.is_main():
            (run_dir / "eval").mkdir(exist_ok=True)
            self.metrics = open(path, "a", encoding="utf-8")
        self.tensorboard = None
        if tensorboard and dist.is_main():
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops the events of an interrupted run after its checkpoint, as above.
            self.tensorboard = SummaryWriter(
                str(run_dir / "tensorboard"), purge_step=start_step + 1 if start_step else None, flush_secs=10
            )

    def record(self, row: dict) -> None:
        if dist.is_main():
            self.metrics.write(json.dumps(row, ensure_ascii=False) + "\n")
            self.metrics.flush()
        if self.tensorboard:
            for key, value in row.items():
                if key not in ("step", "epoch", "split"):
                    self.tensorboard.add_scalar(f"{row.get('split', 'train')}/{key}", value, row["step"])

    def step(self, row: dict, show: bool) -> None:
        self.record(row)
        self.bar.update(1)
        if show and dist.is_main():
            self.bar.write(
                f"step {row['step']:>5}  loss {row['loss']:.4f}  lr {row['lr']:.3g}  "
                f"{row['samples_per_s']:.1f} samples/s  {row['tokens_per_s']:.0f} tokens/s"
            )

    def eval(self, step: int, split: str, metrics: dict) -> None:
        self.record({"step": step, "split": split, **{k: metrics[k] for k in self.kind.metric_names}})
        if dist.is_main():
            write_json(self.run_dir / "eval" / f"{split}-step-{step}.json", metrics)
            recall = "  ".join(f"{name} {row['recall']:.2f}" for name, row in metrics["per_class"].items())
            self.bar.write(f"eval {split} @ step {step}: {self.kind.summary(metrics)}\n  recall per class: {recall}")

    def close(self) -> None:
        self.bar.close()
        if dist.is_main():
            self.metrics.close()
        if self.tensorboard:
            self.tensorboard.close()


class TrainingStopped(ConfigError):
    """Training cannot usefully go on (a non-finite loss, an fp16 loss scale stuck at its minimum):
    stopped with the step named instead of burning the cluster's time."""


# Test hook (documented in docs/troubleshooting.md): make every micro-batch loss of this optimizer
# step NaN, to show the divergence stop on hardware without fp16.
NAN_AT_STEP = "PIPELINE_TEST_NAN_AT_STEP"
MIN_SCALE_PATIENCE = 10  # fp16 steps skipped in a row at the minimum loss scale before stopping


def micro_step(engine, batch: dict, poison: bool = False, loss_fn=None):
    """One micro-batch through the engine: forward, backward, and the optimizer step at a window's end.

    DeepSpeed scales the loss by 1/accumulation in `backward` and applies the update at the
    window's boundary in `step`, so the loss is not divided here. The loss is the model's own
    (its problem_type's), or `loss_fn(logits, labels)` (class weights: task.Task.weighted_loss), a
    mean over the micro-batch's records either way. Returns (loss, boundary).
    """
    if loss_fn is None:
        loss = engine(**batch).loss
    else:
        inputs = {key: value for key, value in batch.items() if key != "labels"}
        loss = loss_fn(engine(**inputs).logits, batch["labels"])
    if poison:
        loss = loss * float("nan")
    engine.backward(loss)
    boundary = engine.is_gradient_accumulation_boundary()  # must be asked before step()
    try:
        engine.step()
    except Exception as e:  # DeepSpeed's fp16 loss scaler gives up with a bare Exception
        if "loss scale already at minimum" in str(e):
            raise TrainingStopped(
                f"optimizer step {engine.global_steps + 1}: fp16 gradients overflow even at the minimum "
                "loss scale; lower the learning rate, use bf16 (compute capability 8.0+), or check "
                "the data"
            ) from None
        raise
    return loss.detach(), boundary


def step_health(engine, fp16: bool) -> dict:
    """Gradient norm every step; under fp16 also the loss scale and the steps the scaler skipped."""
    row = {}
    norm = engine.get_global_grad_norm()
    if norm is not None and math.isfinite(norm):  # an overflowed step's norm is inf: not JSON
        row["grad_norm"] = float(norm)
    if fp16:
        row.update(loss_scale=float(engine.optimizer.loss_scale), skipped_steps=engine.skipped_steps)
    return row


def min_loss_scale(engine) -> float:
    """The floor of DeepSpeed's dynamic loss scaler (fp16.min_loss_scale); 1 when it has none."""
    return getattr(getattr(engine.optimizer, "loss_scaler", None), "min_scale", 1.0)


def check_progress(step: int, epoch: int, loss: float, fp16: bool, skipped: bool, at_min_scale: int) -> None:
    """Stop on a non-finite loss, unless it is fp16's overflow that the loss scaler handles (it skips
    the update and lowers the scale), and on an fp16 scale stuck at its minimum."""
    if not math.isfinite(loss) and not (fp16 and skipped):
        weights = "DeepSpeed skipped this update" if skipped else "the weights are no longer usable"
        raise TrainingStopped(
            f"optimizer step {step} (epoch {epoch}): the training loss is {loss} ({weights}). Resume "
            "from the last checkpoint (--resume auto) with a lower learning rate, or check the data "
            "and precision"
        )
    if at_min_scale >= MIN_SCALE_PATIENCE:
        raise TrainingStopped(
            f"optimizer step {step}: fp16 skipped the last {at_min_scale} steps at the minimum loss "
            "scale; lower the learning rate, use bf16 (compute capability 8.0+), or check the data"
        )


def note_best(state: TrainerState, metric: str, metrics: dict, step: int) -> None:
    """Count a checkpointed dev evaluation toward the best checkpoint and early stopping.

    Every rank computed the same metrics from the same gathered logits; rank 0's value is
    broadcast all the same, so the stop decision cannot differ between ranks.
    """
    state.note_evaluation(dist.broadcast_object(metrics[metric]), step)


def out_of_patience(cfg: TrainConfig, state: TrainerState) -> bool:
    """Early stopping: the last `early_stopping_patience` checkpointed evaluations found no new best."""
    return bool(cfg.early_stopping_patience) and state.evaluations_since_best >= cfg.early_stopping_patience


def train_loop(
    engine, cfg: TrainConfig, data: dict, label_names, state: TrainerState, total_steps: int, per_epoch: int, run: RunLog, save
) -> None:
    """Train from `state` until the weights have had `total_steps` updates, or early stopping ends
    it after a checkpointed evaluation, evaluating and saving on the way.

    Step numbers count accumulation windows, as DeepSpeed's `global_steps` does, and the data
    order follows them; a window whose update fp16 skipped (overflow) does not step the LR
    scheduler, so the run goes on until `total_steps` updates were applied and the schedule ends
    where it was planned. The logged loss is the mean over the window's micro-batches and ranks.
    """
    kind = task.TASKS[cfg.task]
    weights = torch.tensor(list(state.class_weights.values()), dtype=torch.float32)
    loss_fn = kind.weighted_loss(weights) if state.class_weights else None
    micro, accum = engine.train_micro_batch_size_per_gpu(), engine.gradient_accumulation_steps()
    world, global_batch = dist.world_size(), engine.train_batch_size()
    fp16 = engine.fp16_enabled()
    poison_step = int(os.environ.get(NAN_AT_STEP, 0))
    stops = StopRequests()
    window = torch.zeros(3, device=engine.device)  # [sum of micro-batch losses, tokens, ranks asked to stop]
    stats, started, at_min_scale = {"data_wait": 0.0}, time.perf_counter(), 0
    engine.train()
    while state.applied_steps < total_steps and not out_of_patience(cfg, state):
        epoch = state.epoch
        batches = train_batches(data["train"], micro, accum, world, dist.rank(), cfg.seed, epoch, state.step_in_epoch)
        for batch in timed(batches, stats):
            batch = to_device(batch, engine.device)
            loss, boundary = micro_step(engine, batch, state.optimizer_step + 1 == poison_step, loss_fn)
            window[:2] += torch.stack([loss.float(), batch["attention_mask"].sum().float()])
            if not boundary:
                continue
            window[2] = stops.pending()
            skipped = engine.skipped_steps > state.skipped_steps
            state.advance(per_epoch, skipped)
            step = state.optimizer_step
            loss_sum, tokens, stop = dist.all_reduce_sum(window).tolist()
            health = step_health(engine, fp16)
            at_min_scale = at_min_scale + 1 if fp16 and skipped and health["loss_scale"] <= min_loss_scale(engine) else 0
            check_progress(step, epoch, loss_sum / (accum * world), fp16, skipped, at_min_scale)
            # Steps are timed back to back, so logging counts in the next step; only evaluation and
            # checkpoints are left out (the clock pauses for them below).
            now = time.perf_counter()
            elapsed, started = now - started, now
            waited, stats["data_wait"] = stats["data_wait"], 0.0
            run.step(
                {
                    "step": step,
                    "epoch": epoch,
                    "loss": loss_sum / (accum * world),
                    "lr": engine.get_lr()[0],
                    "samples_per_s": global_batch / elapsed,
                    "tokens_per_s": tokens / elapsed,
                    "step_time_s": elapsed,
                    "data_wait_s": waited,
                    **health,
                },
                show=step % cfg.log_every == 0,
            )
            window.zero_()
            paused = time.perf_counter()
            done = state.applied_steps == total_steps
            if cfg.eval_every and step % cfg.eval_every == 0 and not done:
                metrics = evaluate(engine, data["dev"], cfg.eval_batch_size, label_names, kind, cfg.threshold)[0]
                state.thresholds = metrics.get("thresholds")  # multi-label: tuned on this dev evaluation
                run.eval(step, "dev", metrics)
                if cfg.best_metric and cfg.save_every and step % cfg.save_every == 0:  # the best must have a checkpoint
                    note_best(state, cfg.best_metric, metrics, step)
            if cfg.save_every and step % cfg.save_every == 0 and not done:
                save()
            if done or out_of_patience(cfg, state):
                return
            if stop:  # every rank got the same sum: all stop after this step
                raise Stopped(
                    f"stopped on request after optimizer step {step}: checkpoint {save()} saved; rerun "
                    "with --resume if-present (or auto) to continue"
                )
            started += time.perf_counter() - paused


def quiet_libraries() -> None:
    """Library progress bars (dataset saving, weight loading) would interleave with ours."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*_tensor.* is deprecated")  # torch collectives inside DeepSpeed's ZeRO


def prepare_data(cfg: TrainConfig, cache_dir: str, log):
    """Rank 0 reads, checks and tokenizes into the cache while the others wait; all load the cache."""

    info = dist.main_first(lambda: prepare_splits(cfg, tokenizer_source(cfg, cache_dir), cache_dir, log))
    tokenizer = load_tokenizer(info["tokenizer_dir"], cfg.max_length)
    pool, kind = Reading.from_config(cfg).pool, task.TASKS[cfg.task]
    names = info["label_names"]
    data = {name: TokenizedSplit(path, tokenizer.pad_token_id, names, pool, kind) for name, path in info["splits"].items()}
    return data, tokenizer, names, info["train_data"], info["class_weights"]


def start_or_resume(cfg: TrainConfig, log) -> tuple[Path, Path | None]:
    """Rank 0 picks the run directory (new, or the resumed checkpoint's) once; all ranks get it."""

    def decide():
        ckpt = checkpoint.find_resume_checkpoint(cfg.resume, cfg.output_dir, cfg.run_name, log) if cfg.resume else None
        if ckpt is None:
            return new_run_dir(cfg), None
        return str(ckpt.parent.parent), str(ckpt)

    run_dir, ckpt = dist.main_first(decide)
    return Path(run_dir), (Path(ckpt) if ckpt else None)


def finish(engine, cfg: TrainConfig, data: dict, label_names, state: TrainerState, run: RunLog, save, log) -> tuple[Path, dict]:
    """After training: save the last step, choose the checkpoint to export (the last one, or with
    best_metric the best one, loaded into the engine), and evaluate dev and test with exactly those
    weights. Returns (that checkpoint, its metrics per split); writes predictions and eval_results.json.
    """
    kind = task.TASKS[cfg.task]
    step, evaluated = state.optimizer_step, {}  # split -> (metrics, predictions) of the weights to export
    if out_of_patience(cfg, state):
        log.info(
            f"early stopping after step {step}: dev {cfg.best_metric} did not improve in the last "
            f"{state.evaluations_since_best} checkpointed evaluations (best {state.best_metric:.4f} at step {state.best_step})"
        )
    else:  # the last weights' dev evaluation; with best_metric they may be the best
        evaluated["dev"] = evaluate(engine, data["dev"], cfg.eval_batch_size, label_names, kind, cfg.threshold)
        state.thresholds = evaluated["dev"][0].get("thresholds")  # multi-label: saved with the checkpoint and export
        run.eval(step, "dev", evaluated["dev"][0])
        if cfg.best_metric:
            note_best(state, cfg.best_metric, evaluated["dev"][0], step)
    last = save()
    exported = last.with_name(f"step-{state.best_step}") if cfg.best_metric else last
    if exported != last:
        log.info(
            f"exporting the best checkpoint, step {state.best_step} (dev {cfg.best_metric} {state.best_metric:.4f}), not step {step}"
        )
        checkpoint.load_weights(engine, exported)
        evaluated = {}
    results = {}
    for split in [name for name in ("dev", "test") if name in data]:
        # Multi-label: the thresholds are fitted on dev, and test is decided with dev's.
        thresholds = cfg.threshold if split == "dev" else results["dev"].get("thresholds")
        results[split], predictions = evaluated.get(split) or evaluate(
            engine, data[split], cfg.eval_batch_size, label_names, kind, thresholds
        )
        if split != "dev":  # dev was logged when it was evaluated at that step
            run.eval(checkpoint.step_of(exported), split, results[split])
        if dist.is_main():
            (run.run_dir / f"predictions-{split}.jsonl").write_text(
                "".join(
                    json.dumps({kind.output_key: kind.describe(p, label_names)}, ensure_ascii=False) + "\n" for p in predictions
                ),
                encoding="utf-8",
            )
    run.close()
    if dist.is_main():
        chosen = {"best_metric": cfg.best_metric, "best_value": state.best_metric} if cfg.best_metric else {}
        summary = {
            "step": checkpoint.step_of(exported),
            "last_step": step,
            "stopped_early": out_of_patience(cfg, state),
            **chosen,
        }
        write_json(run.run_dir / "eval_results.json", {**summary, **results})
    return exported, results


def run(cfg: TrainConfig) -> dict:
    """Train, evaluate, checkpoint and export; returns the final metrics (on every rank)."""
    quiet_libraries()
    log = dist.get_logger()
    hardware = Hardware.detect()
    raw = load_json(cfg.ds_config)
    # Everything checkable without data is checked before the process group starts.
    early = resolve_ds_config(cfg.ds_config, raw, dist.world_size(), hardware, cfg)
    for line in early.notes + [f"warning: {w}" for w in early.warnings]:
        log.info(line)  # rank 0 only: every rank resolves the same config
    check_model_dir(cfg.model, cfg.max_length)
    dist.init(cfg.dist_timeout_minutes, cfg.rank0_wait_minutes)
    torch.manual_seed(cfg.seed)

    run_dir, resume_from = start_or_resume(cfg, log)
    kind = task.TASKS[cfg.task]
    data, tokenizer, label_names, train_data, class_weights = prepare_data(
        cfg, cfg.cache_dir or str(Path(cfg.output_dir) / "cache"), log
    )
    shape = RunShape(len(data["train"]), str(run_dir))
    if resume_from is not None:
        saved = checkpoint.read_state(resume_from)
        checkpoint.check_same_data(resume_from, saved, train_data, log)
        shape = RunShape(len(data["train"]), str(run_dir), str(resume_from), saved.world_size, saved.train_batch_size)
    resolved = resolve_ds_config(cfg.ds_config, raw, dist.world_size(), hardware, cfg, run=shape)
    ds_config, per_epoch, total_steps = resolved.ds, resolved.steps_per_epoch, resolved.total_steps
    for line in resolved.warnings[len(early.warnings) :]:  # what resuming on another world size gives up
        log.warning(f"warning: {line}")

    model = build_model(
        cfg.model, label_names, len(tokenizer), ds_config, cfg.seed, bool(cfg.gradient_checkpointing), kind.problem_type
    )
    model.config.record_reading = Reading.from_config(cfg).as_dict()  # saved with the export; predict reads as training did
    state = TrainerState(
        world_size=dist.world_size(),
        train_batch_size=ds_config["train_batch_size"],
        label_names=label_names,
        class_weights=class_weights,
        train_data=train_data,
        train_config=asdict(cfg),
        ds_config=ds_config,
    )
    if resume_from is not None:
        saved = checkpoint.check_compatible(resume_from, label_names, model.config, class_weights)
        state.epoch, state.step_in_epoch, state.optimizer_step = saved.epoch, saved.step_in_epoch, saved.optimizer_step
        state.skipped_steps = saved.skipped_steps
        state.best_metric, state.best_step = saved.best_metric, saved.best_step
        state.evaluations_since_best = saved.evaluations_since_best
    engine = build_engine(model, ds_config)
    if resume_from is not None:
        checkpoint.load(engine, resume_from, same_world_size=shape.resumed_world_size == dist.world_size())
        # Step numbers, the data position and the LR schedule follow DeepSpeed's own counters.
        if (engine.global_steps, engine.skipped_steps) != (state.optimizer_step, state.skipped_steps):
            raise checkpoint.CheckpointError(
                f"{resume_from}: DeepSpeed's counters (global_steps {engine.global_steps}, skipped {engine.skipped_steps}) "
                f"disagree with trainer_state.json (optimizer_step {state.optimizer_step}, skipped {state.skipped_steps})"
            )
        log.info(
            f"resumed from {resume_from}: epoch {state.epoch}, {state.step_in_epoch} steps into it, "
            f"optimizer step {state.optimizer_step}"
        )
    if dist.is_main():
        write_json(run_dir / "train_config.json", asdict(cfg))
        write_json(run_dir / "ds_config.json", {**ds_config, "world_size": dist.world_size()})
        if class_weights:  # the weights --class-weights resolved to (also in every checkpoint's trainer state)
            write_json(run_dir / "class_weights.json", class_weights)
    log.info(f"run directory: {run_dir}")
    if class_weights:
        log.info(f"class weights ({cfg.class_weights}): " + ", ".join(f"{k} {w:.3g}" for k, w in class_weights.items()))
    log.info(
        f"device: {hardware.name} | world size {dist.world_size()} | ZeRO stage {ds_config['zero_optimization']['stage']} "
        f"| precision {ds_precision(ds_config)} | gradient checkpointing: {'on' if cfg.gradient_checkpointing else 'off'}"
    )
    log.info(
        f"batch: {ds_config['train_micro_batch_size_per_gpu']} per rank x {ds_config['gradient_accumulation_steps']} "
        f"accumulation x {dist.world_size()} ranks = {ds_config['train_batch_size']} per optimizer step; "
        f"{per_epoch} steps per epoch ({len(data['train']) % ds_config['train_batch_size']} samples left out each epoch), "
        f"{total_steps} steps in all"
    )

    probe = data["dev"].batch(range(min(PROBE_SIZE, len(data["dev"]))))

    def save():
        return checkpoint.save(engine, run_dir, state, tokenizer, probe, ds_precision(ds_config), cfg.keep_checkpoints)

    runlog = RunLog(run_dir, total_steps, state.optimizer_step, bool(cfg.tensorboard), kind)
    train_loop(engine, cfg, data, label_names, state, total_steps, per_epoch, runlog, save)
    exported, results = finish(engine, cfg, data, label_names, state, runlog, save, log)
    export_dir = dist.main_first(lambda: checkpoint.export_checkpoint(exported, run_dir / "export", overwrite=True))
    log.info(f"final dev: {kind.summary(results['dev'])}")
    log.info(
        f"checkpoint: {exported}\nexport (verified): {export_dir}\nmetrics: {run_dir / 'metrics.jsonl'}\n"
        f"eval results: {run_dir / 'eval_results.json'}"
    )
    return results
