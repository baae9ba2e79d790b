"""The training loop: one micro-batch at a time through the engine; log, evaluate, save and stop at
the accumulation window's boundary."""

from __future__ import annotations

import math
import os
import time

import torch

from ..core import dist
from ..core.base import ConfigError
from ..core.stop import Stopped, StopRequests, pause_for_test
from ..data.batching import pinned_for, train_batches
from .evaluate import to_device


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


class TrainingStopped(ConfigError):
    """Training cannot usefully go on (a non-finite loss, an fp16 loss scale stuck at its minimum):
    stopped with the step named instead of burning the cluster's time."""


# Test hook (documented in docs/troubleshooting.md): make every micro-batch loss of this optimizer
# step NaN, to show the divergence stop on hardware without fp16.
NAN_AT_STEP = "PIPELINE_TEST_NAN_AT_STEP"


def stop_agreed(stops: StopRequests) -> bool:
    """Whether any rank has been asked to stop (a collective: every rank calls it at the same point);
    for the points between steps, where no all-reduce of the step carries the vote."""
    return any(dist.all_gather_objects(stops.pending()))


def stopped(step: int, ckpt) -> Stopped:
    return Stopped(
        f"stopped on request after optimizer step {step}: checkpoint {ckpt} saved; rerun with --resume if-present (or auto) to continue"
    )


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


def note_best(run, metrics: dict, step: int) -> None:
    """Count a checkpointed dev evaluation toward the best checkpoint and early stopping.

    Every rank computed the same metrics from the same gathered logits; rank 0's value is
    broadcast all the same, so the stop decision cannot differ between ranks.
    """
    metric = run.task.metric(run.cfg.best_metric)
    run.state.note_evaluation(dist.broadcast_object(metrics[metric.name]), step, metric.higher_is_better)


def evaluate_dev(run, step: int) -> None:
    """The periodic dev evaluation; at a checkpointed step with best_metric it counts toward the best
    checkpoint and early stopping (the best must have a checkpoint)."""
    metrics = run.evaluate("dev")[0]
    run.state.thresholds = metrics.get("thresholds")  # multi-label: tuned on this dev evaluation
    run.log.eval(step, "dev", metrics)
    if run.cfg.best_metric and due(run.cfg.save_every, step):
        note_best(run, metrics, step)


def due(every: int, step: int) -> bool:
    """Whether an interval (--eval-every, --save-every; 0: never) falls on `step`."""
    return bool(every) and step % every == 0


def out_of_patience(cfg, state) -> bool:
    """Early stopping: the last `early_stopping_patience` checkpointed evaluations found no new best."""
    return bool(cfg.early_stopping_patience) and state.evaluations_since_best >= cfg.early_stopping_patience


class WindowTotals:
    """What one accumulation window adds up on this rank, summed over ranks in one all-reduce at its
    boundary: the micro-batch losses, the real tokens, the tokens computed (padded batches) and
    whether this rank was asked to stop."""

    LOSS, TOKENS, PADDED, STOP = range(4)

    def __init__(self, device):
        self.values = torch.zeros(4, device=device)

    def add(self, loss, attention_mask) -> None:
        self.values[self.LOSS] += loss.float()
        self.values[self.TOKENS] += attention_mask.sum().float()
        self.values[self.PADDED] += attention_mask.numel()

    def reduce(self, stop_requested: bool) -> tuple[float, float, float, bool]:
        """(loss sum, real tokens, tokens computed, any rank asked to stop) over every rank; starts
        the next window at zero."""
        self.values[self.STOP] = float(stop_requested)
        totals = dist.all_reduce_sum(self.values).tolist()
        self.values.zero_()
        return totals[self.LOSS], totals[self.TOKENS], totals[self.PADDED], totals[self.STOP] > 0


def train_loop(run) -> None:
    """Train `run` (a train.run.Run) from its state until the weights have had `run.total_steps`
    updates, or early stopping ends it after a checkpointed evaluation, evaluating and saving on the way.

    Step numbers count accumulation windows, as DeepSpeed's `global_steps` does, and the data
    order follows them; a window whose update fp16 skipped (overflow) does not step the LR
    scheduler, so the run goes on until `total_steps` updates were applied and the schedule ends
    where it was planned. The logged loss is the mean over the window's micro-batches and ranks.
    A stop request (any rank) is saved at the boundary it is seen at, leaving a due dev evaluation
    to the resumed run; one that came during an evaluation or a save is acted on right after it.
    """
    engine, cfg, state = run.engine, run.cfg, run.state
    micro, accum = engine.train_micro_batch_size_per_gpu(), engine.gradient_accumulation_steps()
    world, global_batch = dist.world_size(), engine.train_batch_size()
    fp16 = engine.fp16_enabled()
    poison_step = int(os.environ.get(NAN_AT_STEP, 0))
    loss_fn = run.loss_fn  # built once, its class weights on the device: they do not change during training
    window = WindowTotals(engine.device)
    stats, started, at_min_scale = {"data_wait": 0.0}, time.perf_counter(), 0
    engine.train()
    if state.dev_evaluation_due:  # skipped by the stop that saved the checkpoint this run resumed from
        evaluate_dev(run, state.optimizer_step)
        state.dev_evaluation_due = False
    while state.applied_steps < run.total_steps and not out_of_patience(cfg, state):
        epoch = state.epoch
        batches = train_batches(
            run.data.splits["train"], micro, accum, world, dist.rank(), cfg.seed, epoch, state.step_in_epoch, cfg.group_by_length
        )
        batches = pinned_for(engine.device, batches)  # to_device then copies without waiting for the GPU
        epoch_tokens = [0.0, 0.0]  # real, computed: this run's steps of the epoch
        for batch in timed(batches, stats):
            batch = to_device(batch, engine.device)
            loss, boundary = micro_step(engine, batch, state.optimizer_step + 1 == poison_step, loss_fn)
            window.add(loss, batch["attention_mask"])
            if not boundary:
                continue
            pause_for_test(f"step-{state.optimizer_step + 1}")
            loss_sum, tokens, padded, stop = window.reduce(run.stops.pending())
            epoch_tokens = [epoch_tokens[0] + tokens, epoch_tokens[1] + padded]
            skipped = engine.skipped_steps > state.skipped_steps
            state.advance(run.steps_per_epoch, skipped)
            step = state.optimizer_step
            health = step_health(engine, fp16)
            at_min_scale = at_min_scale + 1 if fp16 and skipped and health["loss_scale"] <= min_loss_scale(engine) else 0
            check_progress(step, epoch, loss_sum / (accum * world), fp16, skipped, at_min_scale)
            # Steps are timed back to back, so logging counts in the next step; only evaluation and
            # checkpoints are left out (the clock pauses for them below).
            now = time.perf_counter()
            elapsed, started = now - started, now
            waited, stats["data_wait"] = stats["data_wait"], 0.0
            run.log.step(
                {
                    "step": step,
                    "epoch": epoch,
                    "loss": loss_sum / (accum * world),
                    "lr": engine.get_lr()[0],
                    "samples_per_s": global_batch / elapsed,
                    "tokens_per_s": tokens / elapsed,
                    "padding_efficiency": tokens / padded,
                    "step_time_s": elapsed,
                    "data_wait_s": waited,
                    **health,
                },
                show=step % cfg.log_every == 0,
            )
            paused = time.perf_counter()
            done = state.applied_steps == run.total_steps
            eval_due, save_due = due(cfg.eval_every, step) and not done, due(cfg.save_every, step) and not done
            if stop:  # every rank got the same sum: all save at once and stop; the evaluation runs on resume
                state.dev_evaluation_due = eval_due
                raise stopped(step, run.save())
            if eval_due:
                evaluate_dev(run, step)
            saved = run.save() if save_due else None
            if (eval_due or save_due) and stop_agreed(run.stops):  # asked during them: act now, not a step later
                raise stopped(step, saved or run.save())
            if state.epoch != epoch:
                run.log.epoch(epoch, *epoch_tokens)
            if done or out_of_patience(cfg, state):
                return
            started += time.perf_counter() - paused
