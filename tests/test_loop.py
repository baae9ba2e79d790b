"""The training loop in this process: `Run.setup` builds a real DeepSpeed engine for a world of one
CPU rank (gloo; the `one_rank` fixture), and `train_loop` runs on it directly, without a launcher. What needs several ranks
(exact evaluation, the stop vote across ranks, resume) is in test_train.py, test_stop.py and
test_resume.py."""

import os
import signal

import pytest
from helpers import ds_config, read_jsonl, setup_run, write_jsonl

from pipeline.checkpoint.checkpoints import MANIFEST
from pipeline.checkpoint.export import export_checkpoint
from pipeline.core.options import TrainConfig
from pipeline.core.stop import Stopped
from pipeline.train.loop import NAN_AT_STEP, TrainingStopped
from pipeline.train.run import Run


def forward_count(run: Run) -> list[int]:
    """A one-element list that counts the model's forward passes (micro-batches and evaluation batches)."""
    calls = [0]

    def count(*_):
        calls[0] += 1

    run.engine.module.register_forward_pre_hook(count)
    return calls


def test_one_optimizer_step_per_accumulation_window(one_rank, tmp_path):
    """Also with class weights: the weighted loss is built once, its weights already on the engine's
    device (logits elsewhere are refused, not met by a copy of the weights at every micro-batch)."""
    import torch

    run = setup_run(one_rank, tmp_path, micro=2, accum=4, max_steps=3, class_weights="balanced")
    calls = forward_count(run)
    run.train()
    assert run.loss_fn is run.loss_fn
    logits, labels = torch.zeros(2, len(run.data.label_names)), torch.tensor([0, 1])
    assert run.loss_fn(logits.to(run.engine.device), labels).item() > 0
    with pytest.raises(RuntimeError, match="device"):
        run.loss_fn(logits.to("meta"), labels.to("meta"))
    assert calls[0] == 3 * 4  # every micro-batch through the engine, none more
    assert (run.state.optimizer_step, run.engine.global_steps, run.state.applied_steps) == (3, 3, 3)
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [row["step"] for row in rows] == [1, 2, 3] and all(row["grad_norm"] > 0 for row in rows)


def test_same_seed_same_config_gives_identical_loss_curve(one_rank, sigusr1_kept, tmp_path):
    """Twice with seed 42, once with seed 7 (initial weights, data order and dropout all follow the
    seed). On 2 ranks the same holds across launches: test_stop's and test_slurm's interrupted runs
    log the uninterrupted run's losses before their stop."""

    def curve(name, **seed):
        (tmp_path / name).mkdir()
        run = setup_run(one_rank, tmp_path / name, max_steps=6, **seed)
        run.train()
        return [row["loss"] for row in read_jsonl(tmp_path / name / "run" / "metrics.jsonl")]

    first = curve("first")
    assert curve("again") == first
    assert curve("other", seed=7) != first


def test_a_nan_loss_stops_at_its_step_and_the_skipped_update_is_counted(one_rank, tmp_path, monkeypatch):
    """ZeRO skips the update of a non-finite gradient even in fp32; without fp16's loss scaler to
    handle it, the loop stops naming the step instead of going on with weights it cannot trust."""
    monkeypatch.setenv(NAN_AT_STEP, "2")
    run = setup_run(one_rank, tmp_path, max_steps=4)
    with pytest.raises(TrainingStopped, match=r"optimizer step 2 \(epoch 0\): the training loss is nan \(DeepSpeed skipped"):
        run.train()
    assert (run.state.optimizer_step, run.state.skipped_steps, run.state.applied_steps) == (2, 1, 1)
    assert run.engine.skipped_steps == 1


def test_a_stop_request_ends_the_step_with_a_checkpoint(one_rank, tmp_path):
    run = setup_run(one_rank, tmp_path, max_steps=6)
    calls = forward_count(run)

    def ask_to_stop(*_):  # in the middle of step 2's window (its first micro-batch): step 2 completes, then a save
        if calls[0] == 3:
            os.kill(os.getpid(), signal.SIGUSR1)

    run.engine.module.register_forward_pre_hook(ask_to_stop)
    try:
        with pytest.raises(Stopped, match="stopped on request after optimizer step 2"):
            run.train()
    finally:
        signal.signal(signal.SIGUSR1, signal.SIG_DFL)
    assert run.state.optimizer_step == 2 and calls[0] == 2 * 2 + 1  # two windows, then the checkpoint probe's forward
    ckpt = tmp_path / "run" / "checkpoints" / "step-2"
    assert (ckpt / MANIFEST).is_file()
    export_checkpoint(ckpt, tmp_path / "export")  # the export reproduces the probe logits the loop's engine gave


def test_patience_ends_training_after_evaluations_without_a_new_best(one_rank, tmp_path):
    """With a learning rate of 0 the dev accuracy never moves: the first checkpointed evaluation is
    the best, and patience 2 ends training at the third."""
    run = setup_run(
        one_rank, tmp_path, lr=0.0, max_steps=10, best_metric="accuracy", eval_every=1, save_every=1, early_stopping_patience=2
    )
    run.train()
    state = run.state
    assert (state.optimizer_step, state.best_step, state.evaluations_since_best) == (3, 1, 2)
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step-*")) == ["step-1", "step-2", "step-3"]


def test_every_hugging_face_flag_lands_in_the_engine(one_rank, tmp_path):
    """The shipped config's "auto" values filled by the flags, read back from the engine DeepSpeed built."""
    import shutil

    from helpers import HF_FLAGS, REPO

    shutil.copy(REPO / "ds_configs" / "small_zero2.json", tmp_path / "auto.json")
    run = Run.setup(
        TrainConfig(
            ds_config=str(tmp_path / "auto.json"),
            train_file=str(one_rank["train"]),
            dev_file=str(one_rank["dev"]),
            cache_dir=str(one_rank["cache"]),
            output_dir=str(tmp_path),
            run_name="run",
            max_length=32,
            report_to="none",
            **dict(HF_FLAGS, warmup_steps=3, micro_batch=4),
        )
    )
    engine = run.engine
    group = engine.optimizer.optimizer.param_groups[0]  # ZeRO's wrapper holds the torch AdamW
    assert (group["weight_decay"], tuple(group["betas"]), group["eps"]) == (0.05, (0.8, 0.95), 1e-6)
    scheduler = engine.lr_scheduler
    assert type(scheduler).__name__ == "WarmupCosineLR" and scheduler.org_lrs == [3e-4] * len(scheduler.org_lrs)
    assert (scheduler.warmup_num_steps, scheduler.warmup_type) == (3, "linear")
    assert engine.gradient_clipping() == 0.5 and engine.bfloat16_enabled() and not engine.fp16_enabled()
    assert (engine.train_micro_batch_size_per_gpu(), engine.gradient_accumulation_steps(), engine.train_batch_size()) == (
        4,
        8,
        32,
    )
    assert "run.yaml" in {p.name for p in (tmp_path / "run").iterdir()}


def test_a_run_after_one_refused_in_the_same_process_builds_its_engine(one_rank, tmp_path, capsys):
    """A refusal after the process group started leaves through dist.shutdown; the next run in this
    process (as the in-process tier does) must get a working group, not DeepSpeed's cached copy of the old one."""
    import torch.distributed as td

    from pipeline.cli.main import main

    for name in ("first", "next"):
        (tmp_path / name).mkdir()
    setup_run(one_rank, tmp_path / "first", max_steps=1).train()  # an engine: DeepSpeed caches its groups
    dev = write_jsonl(tmp_path / "dev.jsonl", [{"text": "头痛三天", "label": "偏头痛"}])
    args = ["train", "--ds-config", str(ds_config(tmp_path / "ds.json", 2, micro=2, accum=2))]
    args += ["--train-file", str(one_rank["train"]), "--dev-file", str(dev), "--cache-dir", str(one_rank["cache"])]
    args += ["--output-dir", str(tmp_path), "--max-length", "32", "--report-to", "none", "--baseline", "none"]
    assert main(args) == 2
    assert "label '偏头痛' never appears in the training file" in capsys.readouterr().err
    assert not td.is_initialized()  # the refusal came after the group started, and left it
    run = setup_run(one_rank, tmp_path / "next", max_steps=1)
    run.train()
    assert run.state.optimizer_step == 1
