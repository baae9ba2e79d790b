"""Checkpoints and resume with real ranks: a resumed run equals the uninterrupted one, bit for bit."""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from helpers import (
    EARLY_STOP_SETTINGS,
    REPO,
    cpu_env,
    deepspeed_command,
    ds_config,
    early_stop_step,
    in_ci,
    launch,
    losses,
    pipeline_command,
    rank_processes,
    read_jsonl,
    run_options,
    train,
    write_jsonl,
)
from safetensors.numpy import load_file

from pipeline.checkpoint.checkpoints import consolidated_fp32_state_dict, step_of

pytestmark = pytest.mark.ranks  # every test here launches ranks or trains

# 256 records / (4 x 2 x 2 ranks) = 16 optimizer steps per epoch, 2 epochs; dropout on (tiny-bert).
# Evaluations and saves at their own intervals: neither may change what training does.
RUN_ARGS = [
    "--max-length",
    "64",
    "--eval-batch-size",
    "8",
    "--epochs",
    "2",
    "--eval-every",
    "3",
    "--save-every",
    "2",
    "--keep-checkpoints",
    "20",
]


def train_args(config, data, tmp_path, *extra):
    return [
        "train",
        "--ds-config",
        str(config),
        "--train-file",
        str(data["train"]),
        "--dev-file",
        str(data["dev"]),
        "--output-dir",
        str(tmp_path),
        "--cache-dir",
        str(tmp_path / "cache"),
        *RUN_ARGS,
        *extra,
    ]


def assert_same_run(run, reference):
    assert losses(run) == losses(reference)
    mine, theirs = load_file(run / "export" / "model.safetensors"), load_file(reference / "export" / "model.safetensors")
    assert all((mine[k] == theirs[k]).all() for k in theirs)
    assert (run / "predictions-dev.jsonl").read_text() == (reference / "predictions-dev.jsonl").read_text()


def interrupted_copy(reference, target, last_step):
    """The reference run as it would be if it had died right after saving step `last_step`."""
    shutil.copytree(reference, target)
    shutil.rmtree(target / "export")
    for ckpt in (target / "checkpoints").glob("step-*"):
        if step_of(ckpt) > last_step:
            shutil.rmtree(ckpt)
    return target


@pytest.fixture(scope="module")
def reference(tmp_path_factory, small_data):
    runs = {}

    def get(stage):
        if stage not in runs:
            tmp = tmp_path_factory.mktemp(f"ref-zero{stage}")
            config = ds_config(tmp / "ds.json", stage, micro=4, accum=2, lr=3e-3)
            result = launch(train_args(config, small_data, tmp, "--run-name", "ref"))
            assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
            runs[stage] = (tmp / "ref", config)
        return runs[stage]

    return get


@pytest.mark.parametrize("stage, last_step", [(2, 20), (3, 20), (2, 16)], ids=["mid-epoch-2", "mid-epoch-3", "epoch-boundary-2"])
def test_resume_equals_uninterrupted(reference, small_data, tmp_path, stage, last_step):
    """From step 20 the updates of a restarted DeepSpeed CPU Adam used to differ in the last bits
    (see checkpoint.replay_cpu_adam_steps); from 16 they happened not to. The epoch boundary is the
    data order's case, the same code under either stage: ZeRO-2 only (CI time)."""
    ref, config = reference(stage)
    copy = interrupted_copy(ref, tmp_path / "interrupted", last_step)
    result = launch(train_args(config, small_data, tmp_path, "--resume", str(copy / "checkpoints" / f"step-{last_step}")))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    state = json.loads((copy / "checkpoints" / f"step-{last_step}" / "trainer_state.json").read_text())
    assert (state["epoch"], state["step_in_epoch"]) == ((1, 4) if last_step == 20 else (1, 0))
    assert f"resumed from {copy / 'checkpoints' / f'step-{last_step}'}" in result.stdout
    assert_same_run(copy, ref)


def kill_rank(launcher: subprocess.Popen, rank: int) -> None:
    for p in rank_processes(launcher.pid, rank):
        p.send_signal(signal.SIGKILL)


def start_killable_run(config, data, tmp_path, *extra) -> subprocess.Popen:
    """A training run named 'killed', in the background; its console goes to killed.log."""
    cmd = deepspeed_command(train_args(config, data, tmp_path, "--run-name", "killed", "--dist-timeout-minutes", "0.5", *extra))
    return subprocess.Popen(cmd, cwd=REPO, env=cpu_env(), stdout=open(tmp_path / "killed.log", "w"), stderr=subprocess.STDOUT)


def test_sigkill_during_a_save_leaves_a_partial_that_resume_auto_skips(reference, small_data, tmp_path):
    """Kill rank 1 while a checkpoint is being written: the job fails fast, the half-written
    checkpoint is never resumed from, and `--resume auto` finishes the run exactly as if uninterrupted."""
    ref, config = reference(2)
    job = start_killable_run(config, small_data, tmp_path, "--save-every", "1")
    ckpts = tmp_path / "killed" / "checkpoints"

    def being_written():
        return [p for p in ckpts.glob("step-*") if step_of(p) >= 10 and not (p / "manifest.json").exists()]

    deadline = time.time() + 240
    while not being_written() and job.poll() is None and time.time() < deadline:
        time.sleep(0.001)
    assert job.poll() is None, "the run ended before it could be killed:\n" + (tmp_path / "killed.log").read_text()[-3000:]
    killed_at = time.time()
    kill_rank(job, 1)
    assert job.wait(timeout=60) != 0
    assert time.time() - killed_at < 60
    partial = [p for p in ckpts.glob("step-*") if not (p / "manifest.json").exists()]
    assert len(partial) == 1, "the kill did not land inside a save"
    newest_complete = ckpts / f"step-{step_of(partial[0]) - 1}"
    assert (newest_complete / "manifest.json").exists()

    result = launch(train_args(config, small_data, tmp_path, "--run-name", "killed", "--resume", "auto"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"ignoring incomplete checkpoint {partial[0]}" in result.stdout + result.stderr
    assert f"resumed from {newest_complete}" in result.stdout
    assert_same_run(tmp_path / "killed", ref)


def last_logged_step(metrics) -> int:
    """The newest training step in a metrics.jsonl being written (its last line may be incomplete)."""
    steps = [0]
    for line in metrics.read_text(encoding="utf-8").splitlines() if metrics.exists() else []:
        with contextlib.suppress(json.JSONDecodeError):
            steps.append(json.loads(line)["step"])
    return max(steps)


def test_sigkill_of_rank_0_between_saves_then_resume_auto_is_exact(reference, small_data, tmp_path):
    """Kill rank 0 in the middle of training, after an odd step >= 19 (the save of the next even
    step has not begun), leaving metrics.jsonl with a cut-short last line: `--resume auto` from
    step 18 or later (where a restarted CPU Adam used to drift) finishes the run exactly as if uninterrupted."""
    ref, config = reference(2)
    job = start_killable_run(config, small_data, tmp_path)
    metrics = tmp_path / "killed" / "metrics.jsonl"
    deadline = time.time() + 240
    while not (last_logged_step(metrics) >= 19 and last_logged_step(metrics) % 2) and job.poll() is None:
        assert time.time() < deadline, "training did not reach step 19"
        time.sleep(0.001)
    assert job.poll() is None, "the run ended before it could be killed:\n" + (tmp_path / "killed.log").read_text()[-3000:]
    kill_rank(job, 0)
    assert job.wait(timeout=60) != 0
    ckpts = tmp_path / "killed" / "checkpoints"
    assert all((p / "manifest.json").exists() for p in ckpts.glob("step-*")), "the kill landed inside a save"
    newest = max(ckpts.glob("step-*"), key=step_of)
    assert step_of(newest) >= 18
    with open(metrics, "a", encoding="utf-8") as f:
        f.write('{"step": 99, "epoch": 1, "lo')  # a kill in the middle of writing a line

    result = launch(train_args(config, small_data, tmp_path, "--run-name", "killed", "--resume", "auto"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"{metrics}: dropped its incomplete last line" in result.stdout + result.stderr
    assert f"resumed from {newest}" in result.stdout
    assert_same_run(tmp_path / "killed", ref)


def test_resume_on_changed_training_data_is_refused(reference, small_data, tmp_path):
    """Fewer records put the saved position (step 8 of 16) beyond the new epoch's end (6 steps):
    without a check the loop got no batches and spun forever, calling no collective that could time out.
    (The checkpoint's own tokenizer is given as the model, so the vocabulary, which would otherwise
    be rebuilt from the new data, does not change.)"""
    ref, config = reference(2)
    copy = interrupted_copy(ref, tmp_path / "interrupted", 8)
    ckpt = copy / "checkpoints" / "step-8"
    fewer = {**small_data, "train": write_jsonl(tmp_path / "train.jsonl", read_jsonl(small_data["train"])[:96])}
    result = launch(train_args(config, fewer, tmp_path, "--resume", str(ckpt), "--model", str(ckpt / "hf")), timeout=120)
    assert result.returncode == 2, result.stdout[-3000:] + result.stderr[-3000:]
    assert "the training data differs from the checkpoint's" in result.stderr
    assert "train records 256 -> 96" in result.stderr and "Traceback" not in result.stdout + result.stderr


def test_export_from_zero3_shards_reproduces_the_training_predictions(reference, small_data, tmp_path):
    ref, _ = reference(3)
    out = tmp_path / "exported"
    pipeline_command("export", str(ref / "checkpoints" / "step-32"), str(out), check=True)
    # Into the run directory itself: refused, and nothing deleted.
    before = sorted(p.relative_to(ref) for p in ref.rglob("*"))
    refused = pipeline_command("export", str(ref / "checkpoints" / "step-32"), str(ref))
    assert refused.returncode == 2 and f"error: export: {ref} exists and is not an export" in refused.stderr, refused.stderr
    assert sorted(p.relative_to(ref) for p in ref.rglob("*")) == before
    mine, theirs = load_file(out / "model.safetensors"), load_file(ref / "export" / "model.safetensors")
    assert mine.keys() == theirs.keys() and all((mine[k] == theirs[k]).all() for k in theirs)
    predicted = pipeline_command("predict", "--model", str(out), "--input", str(small_data["dev"]), check=True)
    labels = [json.loads(line)["label"] for line in predicted.stdout.splitlines()]
    assert labels == [row["label"] for row in read_jsonl(ref / "predictions-dev.jsonl")]


@pytest.mark.parametrize(
    "stage, before, after",
    [(2, 2, 1), (2, 1, 2), (3, 2, 1)],
    ids=["zero2-2-to-1-ranks", "zero2-1-to-2-ranks", "zero3-2-to-1-ranks"],
)
def test_resume_on_another_world_size_keeps_the_global_batch(initial_model, small_data, tmp_path, stage, before, after):
    """ZeRO-2 (which DeepSpeed's own universal-checkpoint tests do not cover) and ZeRO-3, through the
    universal format.

    The model has no dropout, so the only difference from the uninterrupted run left is the order
    of floating-point reductions: losses and weights must agree to float32 rounding."""
    accum = {2: 2, 1: 4}  # 4 per rank x accum x ranks = 16
    config = ds_config(tmp_path / "ds.json", stage, micro=4, accum=accum[before])
    args = ("--model", str(initial_model), "--epochs", "1")
    result = launch(train_args(config, small_data, tmp_path, "--run-name", "ref", *args), ranks=before)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ref = tmp_path / "ref"
    copy = interrupted_copy(ref, tmp_path / "interrupted", 6)
    # The same JSON on the new world size: the run must re-derive accumulation to keep 16.
    result = launch(
        train_args(config, small_data, tmp_path, "--resume", str(copy / "checkpoints" / "step-6"), *args), ranks=after
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert f"global batch kept at 16 = 4 x {accum[after]} accumulation x {after}" in output
    assert "not carried over: each rank's RNG state" in output
    resolved = json.loads((copy / "ds_config.json").read_text())
    assert (resolved["train_batch_size"], resolved["gradient_accumulation_steps"], resolved["world_size"]) == (
        16,
        accum[after],
        after,
    )
    assert resolved["zero_optimization"]["stage"] == stage and (copy / "checkpoints" / "step-6.universal").is_dir()
    resumed, reference_curve = losses(copy), losses(ref)
    assert len(resumed) == len(reference_curve) == 16
    assert max(abs(a - b) for a, b in zip(resumed, reference_curve)) < 1e-5, (resumed, reference_curve)
    mine, theirs = load_file(copy / "export" / "model.safetensors"), load_file(ref / "export" / "model.safetensors")
    assert max(abs(mine[k] - theirs[k]).max() for k in theirs) < 1e-5


@pytest.fixture()
def small_fs(tmp_path):
    """make(size): a new directory on its own tmpfs of `size` bytes, unmounted afterwards (needs root)."""
    mounts = []

    def make(size: int):
        path = tmp_path / f"fs{len(mounts)}"
        path.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, text=True)
        if done.returncode != 0:
            (pytest.fail if in_ci() else pytest.skip)(f"cannot mount a tmpfs (needs root): {done.stderr}")
        mounts.append(path)
        return path

    yield make
    for path in mounts:
        subprocess.run(["umount", str(path)], check=True)


@pytest.mark.parametrize("when", ["before-save", "mid-save"])
def test_a_full_disk_stops_every_rank_with_one_clear_error(initial_model, small_data, tmp_path, small_fs, when):
    """before-save: room for one checkpoint, not two; the check against the last checkpoint's size
    refuses the second save before writing. mid-save: room for the first save's estimate but not
    for the checkpoint, so its writes fail on the ranks. Either way: no traceback on any rank, the
    earlier checkpoint intact, nothing half-written left behind."""
    from transformers import AutoModelForSequenceClassification

    from pipeline.checkpoint.checkpoints import verify_manifest

    # The first save's estimate (checkpoint.BYTES_PER_PARAMETER): 16 bytes per parameter.
    estimate = 16 * AutoModelForSequenceClassification.from_pretrained(initial_model).num_parameters()
    out = small_fs(estimate * 16 // 10 if when == "before-save" else estimate + 64 * 1024)
    config = ds_config(tmp_path / "ds.json", 2, micro=4, accum=2)
    result = launch(
        [
            "train",
            "--ds-config",
            str(config),
            "--train-file",
            str(small_data["train"]),
            "--dev-file",
            str(small_data["dev"]),
            "--output-dir",
            str(out),
            "--run-name",
            "run",
            "--cache-dir",
            str(tmp_path / "cache"),
            "--model",
            str(initial_model),
            "--max-length",
            "64",
            "--max-steps",
            "4",
            "--save-every",
            "2",
            "--eval-every",
            "0",
            "--keep-checkpoints",
            "5",
            "--dist-timeout-minutes",
            "1",
        ],
        timeout=240,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 2 and "Traceback" not in output, output[-4000:]
    step, kept = (4, ["step-2"]) if when == "before-save" else (2, [])
    assert (
        f"error: checkpoint step {step} not written: no space left on the output file system ({out / 'run'}): " in result.stderr
    )
    ckpts = out / "run" / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("step-*")) == kept
    for name in kept:
        verify_manifest(ckpts / name)


def test_a_resumed_run_keeps_the_patience_count_and_stops_where_the_uninterrupted_one_did(early_stopped, small_data, tmp_path):
    """Interrupted after a checkpointed evaluation that did not improve on the best: the count of such
    evaluations comes back from trainer_state.json, so the resumed run stops at the same step."""
    config, ref = early_stopped(2)
    stop, best = early_stop_step(ref, every=2, patience=3)
    assert stop is not None
    last_step = stop - 2  # two evaluations without a new best so far: one more stops the run
    assert (
        json.loads((ref / "checkpoints" / f"step-{last_step}" / "trainer_state.json").read_text())["evaluations_since_best"] == 2
    )
    copy = interrupted_copy(ref, tmp_path / "interrupted", last_step)
    (copy / "eval_results.json").unlink()
    args = ["train", "--ds-config", str(config), *run_options(small_data, tmp_path), *EARLY_STOP_SETTINGS]
    result = launch([*args, "--resume", str(copy / "checkpoints" / f"step-{last_step}")])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"early stopping after step {stop}:" in result.stdout
    assert json.loads((copy / "eval_results.json").read_text())["step"] == best
    assert_same_run(copy, ref)


# A run that finishes all 4 steps with a dev evaluation and a checkpoint every 2; patience 1 makes a
# final evaluation counted twice (a resumed finished run) end it "early".
BRANCH_SETTINGS = (
    "--max-length 64 --max-steps 4 --epochs 2 --eval-every 2 --save-every 2 --keep-checkpoints 10 "
    "--best-metric macro_f1 --early-stopping-patience 1 --log-every 1 --report-to none"
).split()


@pytest.fixture(scope="module")
def finished(tmp_path_factory, small_data):
    """(DeepSpeed config, run directory) of BRANCH_SETTINGS at lr 1e-3 on 2 CPU ranks."""
    tmp = tmp_path_factory.mktemp("finished")
    config = ds_config(tmp / "ds.json", 2, micro=4, accum=2)
    return config, train(tmp, "run", small_data, config, extra=BRANCH_SETTINGS)


def resume_copy(run_dir, tmp_path, data, config, resume):
    """Resume a copy of `run_dir` (as tmp_path/run) with `config`, from `resume` ("auto" or a
    checkpoint name, "step-N"); returns (the launch's result, the copy)."""
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    where = resume if resume == "auto" else str(copy / "checkpoints" / resume)
    args = ["train", "--ds-config", str(config), *run_options(data, tmp_path), *BRANCH_SETTINGS, "--resume", where]
    return launch(args), copy


def test_resuming_an_older_checkpoint_owns_the_later_steps(finished, small_data, tmp_path):
    """Resumed from step 2 (to go on another way): the old step 4 is moved aside, named; the new
    step 4 is saved; the export holds this run's weights."""
    config, first = finished
    result, copy = resume_copy(first, tmp_path, small_data, config, "step-2")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (aside,) = (copy / "checkpoints").glob("superseded-after-step-2-*")
    assert f"moved aside to {aside}" in result.stdout + result.stderr
    assert (aside / "step-4" / "manifest.json").is_file() and (copy / "checkpoints" / "step-4" / "manifest.json").is_file()
    exported = json.loads((copy / "eval_results.json").read_text())["step"]
    mine = load_file(copy / "export" / "model.safetensors")
    theirs = consolidated_fp32_state_dict(copy / "checkpoints" / f"step-{exported}")
    assert all((mine[k] == theirs[k].numpy()).all() for k in theirs)


def test_a_new_learning_rate_on_resume_is_applied_and_said(finished, small_data, tmp_path):
    _, first = finished
    faster = ds_config(tmp_path / "ds-faster.json", 2, micro=4, accum=2, lr=4e-3)
    result, copy = resume_copy(first, tmp_path, small_data, faster, "step-2")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert [row["lr"] for row in read_jsonl(copy / "metrics.jsonl") if "split" not in row] == [1e-3, 1e-3, 4e-3, 4e-3]
    assert "resumed optimizer: lr 0.001 -> 0.004 (this run's DeepSpeed config applies, not the checkpoint's)" in result.stdout


def test_resuming_a_finished_run_counts_its_final_evaluation_once(finished, small_data, tmp_path):
    config, first = finished
    results = json.loads((first / "eval_results.json").read_text())
    assert results["stopped_early"] is False and results["last_step"] == 4  # it ran all its steps
    result, copy = resume_copy(first, tmp_path, small_data, config, "auto")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "early stopping" not in result.stdout
    assert json.loads((copy / "eval_results.json").read_text()) == results


def test_every_file_of_a_run_follows_the_umask(finished):
    _, run_dir = finished
    mask = os.umask(0)
    os.umask(mask)
    # Read and write bits (DeepSpeed adds execute to its zero_to_fp32.py scripts).
    modes = {str(p.relative_to(run_dir)): p.stat().st_mode & 0o666 for p in run_dir.rglob("*") if p.is_file()}
    assert "export/model.safetensors" in modes
    assert {name: mode for name, mode in modes.items() if mode != 0o666 & ~mask} == {}


def test_an_export_that_cannot_delete_the_earlier_one_keeps_one_in_place(finished, tmp_path, monkeypatch):
    """Files busy on NFS: the earlier export cannot be deleted entirely. One export stays, complete."""
    from pipeline.checkpoint import export as export_module

    _, run_dir = finished
    target = export_module.export_checkpoint(run_dir / "checkpoints" / "step-2", tmp_path / "export")
    real_rmtree = shutil.rmtree

    def busy_rmtree(path, ignore_errors=False):
        if ".tmp" in str(path):
            return real_rmtree(path, ignore_errors=ignore_errors)
        (Path(path) / "model.safetensors").unlink(missing_ok=True)  # deleted part of it, then
        if not ignore_errors:
            raise OSError(16, "Device or resource busy", str(path))

    monkeypatch.setattr(export_module.shutil, "rmtree", busy_rmtree)
    with contextlib.suppress(OSError):
        export_module.export_checkpoint(run_dir / "checkpoints" / "step-4", target, overwrite=True)
    assert export_module.is_export(target) and (target / "model.safetensors").is_file()
    export_module.check_export_weights(target)


def test_a_full_disk_outside_a_save_stops_every_rank_with_one_line(initial_model, small_data, tmp_path, small_fs):
    """A 16 KB output file system fills while metrics.jsonl grows (no checkpoint is due)."""
    out = small_fs(16 * 1024)
    config = ds_config(tmp_path / "ds.json", 2, micro=4, accum=2)
    args = ["train", "--ds-config", str(config), "--train-file", str(small_data["train"]), "--dev-file", str(small_data["dev"])]
    args += ["--output-dir", str(out), "--run-name", "run", "--cache-dir", str(tmp_path / "cache"), "--model", str(initial_model)]
    args += ["--max-length", "64", "--max-steps", "150", "--epochs", "10", "--save-every", "0", "--eval-every", "0"]
    result = launch([*args, "--report-to", "none", "--dist-timeout-minutes", "1"], timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 2 and "Traceback" not in output, output[-4000:]
    assert "error: no space left on the output file system: " in result.stderr
