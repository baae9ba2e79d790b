"""One training run, built once: `Run.setup(cfg)` -> `run.train()` -> `run.finish()`.

    ./launch.sh                                          # the default run, 2 ranks on this machine
    deepspeed --num_gpus 2 --module pipeline train --ds-config ds_configs/small_zero2.json

Every rank runs this. `Run.setup` works out each fact once — the task, the reading, the cache
directory, the DeepSpeed config (resolved before the process group, completed for the data and any
resumed checkpoint), the data, the model and engine, the trainer state — and the loop
(`loop.train_loop`), evaluation, saving and the final export read them from the run. Rank 0 alone
prints, writes metrics and builds caches; collectives (forward passes in evaluation, the loss
all-reduce, checkpoint saves) run on every rank.
"""

from __future__ import annotations

import fnmatch
import itertools
import json
import os
import shlex
import socket
import stat
import time
import warnings
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path

import torch

from .. import tasks
from ..checkpoint import checkpoints as checkpoint
from ..checkpoint.export import export_checkpoint
from ..core import dist
from ..core.base import ConfigError, close_new_files, load_json, write_json, write_text
from ..core.ds_config import Hardware, ResolvedConfig, RunShape, ds_precision, resolve_ds_config
from ..core.model_dir import check_model_dir
from ..core.options import TrainConfig, write_run_file
from ..core.stop import Stopped, StopRequests, pause_for_test
from ..data.cache import CACHE_DATA, TokenizedSplit, prepare_splits, prepare_text_files, tokenizer_fingerprint
from ..data.reading import Reading
from ..data.tokenizer import TOKENIZER_KEY, load_tokenizer, tokenizer_source
from ..tasks.base import Task
from . import baseline
from .evaluate import evaluate, forward_logits
from .loop import note_best, out_of_patience, stop_agreed, stopped, train_loop
from .model import build_engine, build_model
from .runlog import RunLog
from .state import TrainerState, read_state
from .tracking import Trackers

PROBE_SIZE = 8  # dev records whose logits the export must reproduce
RUN_DS_CONFIG = "ds_config.given.json"  # the DeepSpeed JSON as the run was given it
VAL_SPLIT = "val_split.json"  # --val-size: the training records held out as dev


OWNER = "owner.json"  # who claimed the run directory, written the moment it is created
FINISHED = ("eval_results.json", "export", "predictions-*.jsonl")  # what only a finished run leaves


def new_run_dir(cfg: TrainConfig) -> str:
    """Rank 0 names and claims the run directory once (the others receive it): never two clocks, never two names.

    The directory is created exclusively and claimed at once (OWNER: host, pid, uid), before the
    data are prepared: a second launch of the same --run-name is refused, whether the first still
    runs or has finished, and a name from the clock that is taken (two runs started in the same
    second) becomes NAME-2, NAME-3, ... Only `--resume if-present` reuses its own directory (a
    retried job whose first attempt died before its first checkpoint), and not a finished run's.
    """
    output = Path(cfg.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("run-%Y%m%d-%H%M%S")
    names = [cfg.run_name] if cfg.run_name else (stamp if n == 1 else f"{stamp}-{n}" for n in itertools.count(1))
    for name in names:
        run_dir = output / name
        try:
            run_dir.mkdir()
            break
        except FileExistsError:
            if not cfg.run_name:
                continue
            if cfg.resume != "if-present":
                raise ConfigError(
                    f"run directory {run_dir} already exists ({claimed_by(run_dir)}); choose another --run-name, "
                    "or --resume auto to continue it"
                ) from None
            refuse_finished(run_dir)
    write_json(
        run_dir / OWNER,
        {"host": socket.gethostname(), "pid": os.getpid(), "uid": os.getuid(), "claimed": time.strftime("%Y-%m-%d %H:%M:%S")},
    )
    return str(run_dir)


def claimed_by(run_dir: Path) -> str:
    """Who claimed `run_dir`, for a message."""
    try:
        owner = load_json(run_dir / OWNER)
    except ConfigError:
        return f"no {OWNER}: not claimed by a run of this version"
    return f"claimed by pid {owner.get('pid')} on {owner.get('host')} at {owner.get('claimed')}"


def refuse_finished(run_dir: Path) -> None:
    """`--resume if-present` found no checkpoint in `run_dir`: a fresh start there must not replace a finished run's results."""
    found = sorted(p.name for pattern in FINISHED for p in run_dir.glob(pattern))
    if found:
        raise ConfigError(
            f"--resume if-present: {run_dir} holds a finished run ({', '.join(found)}) and no complete checkpoint to "
            "resume; starting it afresh would replace them: choose another --run-name, or move that directory away"
        )


# Files that hold patients' text, verbatim or tokenized: what other users of the machine must not read.
PATIENT_TEXT = (CACHE_DATA, "predictions-*.jsonl", checkpoint.PROBE, VAL_SPLIT)


def readable_by_others(directory: Path) -> Path | None:
    """A file of patients' text under `directory` that any user can read (readable by others, and every
    directory down to it searchable by them: a name is enough, no listing needed), or None."""
    for root, dirs, files in os.walk(directory):
        if not os.stat(root).st_mode & stat.S_IXOTH:
            dirs.clear()  # others cannot get in: nothing below is theirs to read
            continue
        for name in files:
            if (
                any(fnmatch.fnmatch(name, pattern) for pattern in PATIENT_TEXT)
                and os.stat(Path(root) / name).st_mode & stat.S_IROTH
            ):
                return Path(root) / name
    return None


def warn_readable_by_others(cfg: TrainConfig, log) -> None:
    """One warning line per existing output or cache directory whose patients' text other users can read
    (written before --file-access, or with --file-access umask): what this run writes is closed, not what is there."""
    output, cache = Path(cfg.output_dir).resolve(), Path(cfg.cache_directory()).resolve()
    for directory in [output] + ([] if cache.is_relative_to(output) else [cache]):
        found = readable_by_others(directory)
        if found:
            log.warning(
                f"warning: {directory} holds patients' text that other users can read ({found.relative_to(directory)}); "
                f"close it with: chmod -R o-rwx {shlex.quote(str(directory))}"
            )


def quiet_libraries() -> None:
    """Library progress bars (dataset saving, weight loading) would interleave with ours."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*_tensor.* is deprecated")  # torch collectives inside DeepSpeed's ZeRO


@dataclass
class PreparedData:
    """The tokenized splits every rank loads from rank 0's cache, and what was learned reading them."""

    splits: dict[str, TokenizedSplit]  # train, dev and (if given) test
    tokenizer: object
    label_names: list[str]
    train_data: dict  # data.cache.train_fingerprint: a resume must find it unchanged
    class_weights: dict  # {label: weight} of the loss; empty: unweighted
    cache_paths: dict  # split -> its tokenized cache directory (the baseline's key reads their digests)
    dev_records: list | None = None  # with --val-size: the training file's record numbers held out as dev


def prepare_data(cfg: TrainConfig, task: Task, reading: Reading, cache_dir: str, log) -> PreparedData:
    """Rank 0 reads, checks and tokenizes into the cache while the others wait; all load the cache.
    Pretraining: the text files' records, cut into a training and a held-out ("dev") part, masked."""
    pause_for_test("data")
    prepare = prepare_text_files if task.pretraining else prepare_splits
    info = dist.main_first(lambda: prepare(cfg, task, tokenizer_source(cfg, cache_dir), cache_dir, log))
    tokenizer = load_tokenizer(info["tokenizer_dir"], cfg.max_length)
    names = info["label_names"]
    if task.pretraining:
        masking = task.masking(cfg, tokenizer)
        splits = TokenizedSplit.held_out(info["splits"]["text"], tokenizer.pad_token_id, masking, cfg.heldout_fraction, cfg.seed)
        log.info(f"pretrain: {len(splits['train'])} training and {len(splits['dev'])} held-out windows, {cfg.masking} masking")
    else:
        splits = {
            name: TokenizedSplit.from_cache(path, tokenizer.pad_token_id, names, task, reading.pool)
            for name, path in info["splits"].items()
        }
    return PreparedData(splits, tokenizer, names, info["train_data"], info["class_weights"], info["splits"], info["dev_records"])


def start_or_resume(cfg: TrainConfig, log) -> tuple[Path, Path | None]:
    """Rank 0 picks the run directory (new, or the resumed checkpoint's) once; all ranks get it."""

    def decide():
        ckpt = checkpoint.find_resume_checkpoint(cfg.resume, cfg.output_dir, cfg.run_name, log) if cfg.resume else None
        if ckpt is None:
            return new_run_dir(cfg), None
        return str(ckpt.parent.parent), str(ckpt)

    run_dir, ckpt = dist.main_first(decide)
    return Path(run_dir), (Path(ckpt) if ckpt else None)


@dataclass
class Run:
    """Everything a training run decided, once; the loop, evaluation, saving and export read it here.

    `Run.setup(cfg)` builds it on every rank; tests may build one from parts (a real engine in one
    process) to drive `train_loop` directly."""

    cfg: TrainConfig
    task: Task
    run_dir: Path
    data: PreparedData
    ds: ResolvedConfig  # the DeepSpeed config as the engine uses it, with the run's length
    engine: object
    state: TrainerState
    log: RunLog
    probe: dict  # a few dev records whose logits the export must reproduce
    stops: StopRequests = field(default_factory=StopRequests)  # stop requests (signals, stop file) since setup began
    baseline_job: baseline.BaselineJob | None = None  # rank 0's: the TF-IDF baseline, cached or fitting in the background

    @property
    def total_steps(self) -> int:
        return self.ds.total_steps

    @property
    def steps_per_epoch(self) -> int:
        return self.ds.steps_per_epoch

    @cached_property
    def loss_fn(self):
        """The class-weighted loss, or None for the model's own; its weights are put on the engine's
        device once, here, not copied there at every micro-batch."""
        if not self.state.class_weights:
            return None
        weights = torch.tensor(list(self.state.class_weights.values()), dtype=torch.float32, device=self.engine.device)
        return self.task.weighted_loss(weights)

    @classmethod
    def setup(cls, cfg: TrainConfig) -> Run:
        """Check what needs no process group, start it, then data -> model -> engine -> state (or resume).

        A stop requested during setup ends it at the next stage with Stopped: nothing to save yet."""
        close_new_files(cfg.file_access)  # before anything is written; the process is this run's alone
        stops = StopRequests()  # a signal during data preparation must not kill a rank
        quiet_libraries()
        log = dist.get_logger()
        task = tasks.resolve(cfg)
        reading = Reading.from_config(cfg)
        hardware = Hardware.detect()
        resolved = resolve_ds_config(cfg.ds_config, load_json(cfg.ds_config), dist.world_size(), hardware, cfg)
        for line in resolved.notes + [f"warning: {w}" for w in resolved.warnings]:
            log.info(line)  # rank 0 only: every rank resolves the same config
        check_model_dir(cfg.model, cfg.max_length)
        dist.init(cfg.dist_timeout_minutes, cfg.rank0_wait_minutes)
        torch.manual_seed(cfg.seed)

        if dist.is_main() and cfg.file_access != "umask":  # open by choice: nothing to warn of
            warn_readable_by_others(cfg, log)
        run_dir, resume_from = start_or_resume(cfg, log)
        data = prepare_data(cfg, task, reading, cfg.cache_directory(), log)
        stop_before_training(stops, "data preparation")
        baseline_job = baseline.start(cfg, task, data, run_dir, log) if dist.is_main() else None  # runs beside training
        saved = read_state(resume_from) if resume_from is not None else None
        shape = RunShape(len(data.splits["train"]), str(run_dir))
        if saved is not None:
            checkpoint.check_same_data(resume_from, saved, data.train_data, log)
            checkpoint.check_same_settings(resume_from, saved, asdict(cfg))
            shape = RunShape(shape.num_records, str(run_dir), str(resume_from), saved.world_size, saved.train_batch_size)
        resolved = resolved.for_run(cfg, dist.world_size(), shape)
        for line in resolved.warnings:  # what resuming on another world size gives up
            log.warning(f"warning: {line}")
        ds = resolved.ds

        weights = list(data.class_weights.values()) or None
        bias = task.initial_bias(data.splits["train"].record_labels, weights) if task.initial_bias else None
        model = build_model(
            cfg.model, data.label_names, len(data.tokenizer), ds, cfg.seed, bool(cfg.gradient_checkpointing), task, bias
        )
        model.config.record_reading = reading.as_dict()  # saved with the export; predict reads as training did
        setattr(model.config, TOKENIZER_KEY, tokenizer_fingerprint(data.tokenizer))  # never read with another one
        state = TrainerState(
            world_size=dist.world_size(),
            train_batch_size=ds["train_batch_size"],
            label_names=data.label_names,
            class_weights=data.class_weights,
            train_data=data.train_data,
            train_config=asdict(cfg),
            ds_config=ds,
        )
        if saved is not None:
            checkpoint.check_compatible(resume_from, saved, data.label_names, model.config, data.class_weights)
            state.continue_from(saved)
        engine = build_engine(model, ds)
        if saved is not None:
            checkpoint.load(engine, resume_from, same_world_size=shape.resumed_world_size == dist.world_size())
            # Step numbers, the data position and the LR schedule follow DeepSpeed's own counters.
            if (engine.global_steps, engine.skipped_steps) != (state.optimizer_step, state.skipped_steps):
                raise checkpoint.CheckpointError(
                    f"{resume_from}: DeepSpeed's counters (global_steps {engine.global_steps}, skipped {engine.skipped_steps}) "
                    f"disagree with trainer_state.json (optimizer_step {state.optimizer_step}, skipped {state.skipped_steps})"
                )
            apply_optimizer_settings(engine, ds, saved.ds_config, log)
        stop_before_training(stops, "model build and checkpoint load")
        if saved is not None:
            aside = dist.main_first(lambda: checkpoint.supersede_later(resume_from))
            if aside:
                log.info(f"warning: checkpoints after {resume_from.name} (a branch this run abandons) moved aside to {aside}")
            log.info(
                f"resumed from {resume_from}: epoch {state.epoch}, {state.step_in_epoch} steps into it, "
                f"optimizer step {state.optimizer_step}"
            )

        def write_run_files():  # rank 0's, through main_first: a full disk stops every rank with one line
            write_json(run_dir / "train_config.json", asdict(cfg))
            write_json(run_dir / "ds_config.json", {**ds, "world_size": dist.world_size()})
            # `launch RUN_DIR/run.yaml` repeats the run: every option, and the DeepSpeed JSON as given
            # ("auto" values and all: another world size resolves it again).
            write_json(run_dir / RUN_DS_CONFIG, load_json(cfg.ds_config))
            write_run_file(run_dir / "run.yaml", {**cfg.run_file(), "ds_config": str((run_dir / RUN_DS_CONFIG).resolve())})
            if data.dev_records is not None:
                write_json(
                    run_dir / VAL_SPLIT,
                    {"train_file": cfg.train_file, "val_size": cfg.val_size, "seed": cfg.seed, "dev_records": data.dev_records},
                )
            if data.class_weights:  # the weights --class-weights resolved to (also in every checkpoint's trainer state)
                write_json(run_dir / "class_weights.json", data.class_weights)

        dist.main_first(write_run_files)
        log.info(f"run directory: {run_dir}")
        if data.class_weights:
            log.info(f"class weights ({cfg.class_weights}): " + ", ".join(f"{k} {w:.3g}" for k, w in data.class_weights.items()))
        log.info(
            f"device: {hardware.name} | world size {dist.world_size()} | ZeRO stage {ds['zero_optimization']['stage']} "
            f"| precision {ds_precision(ds)} | gradient checkpointing: {'on' if cfg.gradient_checkpointing else 'off'}"
        )
        train_records = len(data.splits["train"])
        log.info(
            f"batch: {ds['train_micro_batch_size_per_gpu']} per rank x {ds['gradient_accumulation_steps']} "
            f"accumulation x {dist.world_size()} ranks = {ds['train_batch_size']} per optimizer step; "
            f"{resolved.steps_per_epoch} steps per epoch ({train_records % ds['train_batch_size']} samples left out each epoch), "
            f"{resolved.total_steps} steps in all"
        )
        dev = data.splits["dev"]
        probe = dev.batch(range(min(PROBE_SIZE, len(dev))))
        trackers = None
        if dist.is_main():  # rank 0 reports; a tracker's run id goes into every checkpoint, for a resumed run
            trackers = Trackers(cfg, run_dir, state.optimizer_step, state.tracker_runs, log)
            state.tracker_runs.update(trackers.run_ids)
            trackers.params({"train": asdict(cfg), "ds": {**ds, "world_size": dist.world_size()}})
        runlog = RunLog(run_dir, resolved.total_steps, state.optimizer_step, task, trackers)
        return cls(cfg, task, run_dir, data, resolved, engine, state, runlog, probe, stops, baseline_job)

    def evaluate(self, split: str, thresholds=None):
        """(metrics, predictions) of the live weights on a split; every rank must call this.
        Multi-label: `thresholds` {label: threshold} decide, else --threshold is fitted on this split."""
        pause_for_test("evaluate")
        return evaluate(
            self.engine,
            self.data.splits[split],
            self.cfg.eval_batch_size,
            self.data.label_names,
            self.task,
            self.cfg.threshold if thresholds is None else thresholds,
            split,
        )

    def save(self) -> Path:
        """A complete checkpoint of this step on every rank (see checkpoint.checkpoints.save)."""
        pause_for_test("save")
        return checkpoint.save(
            self.engine,
            self.run_dir,
            self.state,
            self.data.tokenizer,
            self.probe,
            lambda: self.task.probe_view(forward_logits(self.engine, self.probe)),
            ds_precision(self.ds.ds),
            self.cfg.keep_checkpoints,
        )

    def train(self) -> None:
        train_loop(self)

    def finish(self) -> dict:
        """After training: save the last step (before anything else, so a stop or kill from here on
        loses no step), choose the checkpoint to export (the last one, or with best_metric the best
        one, loaded into the engine), evaluate dev and test with exactly those weights, write
        predictions and eval_results.json, and export. Returns the metrics per split.

        The final dev evaluation is not in the last checkpoint: a finished run resumed from it
        evaluates once more and counts that evaluation once."""
        cfg, state, log = self.cfg, self.state, dist.get_logger()
        step, evaluated = state.optimizer_step, {}  # split -> (metrics, predictions) of the weights to export
        stopped_early = out_of_patience(cfg, state)
        last = self.save()
        if stop_agreed(self.stops):
            raise stopped(step, last)
        if stopped_early:
            log.info(
                f"early stopping after step {step}: dev {cfg.best_metric} did not improve in the last "
                f"{state.evaluations_since_best} checkpointed evaluations (best {state.best_metric:.4f} at step {state.best_step})"
            )
        else:  # the last weights' dev evaluation; with best_metric they may be the best
            evaluated["dev"] = self.evaluate("dev")
            state.thresholds = evaluated["dev"][0].get("thresholds")  # multi-label: exported with the last weights
            self.log.eval(step, "dev", evaluated["dev"][0])
            if cfg.best_metric:
                note_best(self, evaluated["dev"][0], step)
                # The final evaluation may make the last step the best: the earlier best goes, as at a save.
                root = self.run_dir / checkpoint.CHECKPOINTS
                dist.main_first(lambda: checkpoint.prune(root, cfg.keep_checkpoints, state.best_step))
            if stop_agreed(self.stops):
                raise stopped(step, last)
        exported = last.with_name(f"step-{state.best_step}") if cfg.best_metric else last
        if exported != last:
            log.info(
                f"exporting the best checkpoint, step {state.best_step} (dev {cfg.best_metric} {state.best_metric:.4f}), not step {step}"
            )
            checkpoint.load_weights(self.engine, exported)
            evaluated = {}
        results = {}
        for split in [name for name in ("dev", "test") if name in self.data.splits]:
            # Multi-label: the thresholds are fitted on dev, and test is decided with dev's.
            thresholds = None if split == "dev" else results["dev"].get("thresholds")
            results[split], predictions = evaluated.get(split) or self.evaluate(split, thresholds)
            if split != "dev":  # dev was logged when it was evaluated at that step
                self.log.eval(checkpoint.step_of(exported), split, results[split])
            if predictions is None:  # pretraining predicts nothing
                continue
            describe, key = self.task.describe, self.task.output_key
            rows = "".join(json.dumps({key: describe(p, self.data.label_names)}, ensure_ascii=False) + "\n" for p in predictions)
            dist.main_first(lambda: write_text(self.run_dir / f"predictions-{split}.jsonl", rows))
        chosen = {"best_metric": cfg.best_metric, "best_value": state.best_metric} if cfg.best_metric else {}
        summary = {"step": checkpoint.step_of(exported), "last_step": step, "stopped_early": stopped_early, **chosen}

        def write_results():  # rank 0's; the other ranks wait here if the baseline is still being fitted
            beside = self.baseline_job.collect(log) if self.baseline_job else None
            if beside:
                write_json(self.run_dir / "eval" / baseline.RESULT, beside)
            write_json(self.run_dir / "eval_results.json", {**summary, **results, **({"baseline": beside} if beside else {})})
            return beside

        beside = dist.main_first(write_results)
        thresholds = state.thresholds if exported == last else None  # the best checkpoint's are its own
        export_dir = dist.main_first(lambda: export_checkpoint(exported, self.run_dir / "export", True, thresholds))
        files = [self.run_dir / "eval_results.json", export_dir / "README.md"]
        self.log.close(step, files, {"export": str(Path(export_dir).resolve()), "checkpoint": str(exported)})
        for split in results:
            log.info(f"final {split}: {self.task.summary(results[split])}")
            if beside:
                log.info(f"baseline {split}: {self.task.summary(beside[split])}  ({beside['description']})")
        if beside:
            log.info(baseline.verdict(self.task, results, beside, cfg.best_metric))
        log.info(
            f"checkpoint: {exported}\nexport (verified): {export_dir}\nmetrics: {self.run_dir / 'metrics.jsonl'}\n"
            f"eval results: {self.run_dir / 'eval_results.json'}"
        )
        return results


def stop_before_training(stops: StopRequests, stage: str) -> None:
    """A stop asked for on any rank during `stage` of setup ends the run on every rank: nothing to save yet."""
    if stop_agreed(stops):
        raise Stopped.before_training(stage)


OPTIMIZER_SETTINGS = ("lr", "betas", "eps", "weight_decay")


def apply_optimizer_settings(engine, ds: dict, saved_ds: dict, log) -> None:
    """This run's optimizer settings, not the checkpoint's: DeepSpeed's load restored the saved
    param_groups, which would silently keep the first run's learning rate. With an LR scheduler the
    learning rate is the scheduler's at this step (its parameters come from this run's config;
    DeepSpeed restores only its position). What differs from the checkpoint's config is said."""
    params = dict(ds.get("optimizer", {}).get("params", {}))
    before = saved_ds.get("optimizer", {}).get("params", {})
    changed = [
        f"{key} {before[key]} -> {params[key]}"
        for key in OPTIMIZER_SETTINGS
        if before.get(key, params.get(key)) != params.get(key)
    ]
    if getattr(engine, "lr_scheduler", None) is not None and hasattr(engine.lr_scheduler, "get_lr"):
        params["lr"] = engine.lr_scheduler.get_lr()[0]
    for key in (k for k in OPTIMIZER_SETTINGS if k in params):
        for group in engine.optimizer.param_groups:
            group[key] = tuple(params[key]) if key == "betas" else params[key]
    if changed:
        log.info(f"resumed optimizer: {', '.join(changed)} (this run's DeepSpeed config applies, not the checkpoint's)")


def run(cfg: TrainConfig) -> dict:
    """Train, evaluate, checkpoint and export; returns the final metrics (on every rank)."""
    run = Run.setup(cfg)
    run.train()
    return run.finish()
