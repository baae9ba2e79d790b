"""Checkpoints and resume: with real ranks (kills, ZeRO-3, world-size changes, a full disk), a resumed
run equals the uninterrupted one, bit for bit; what ranks do not change (a branch, a new learning
rate, a finished run, other data) on the in-process engine of one rank."""

import json
import logging
import os
import re
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
    rank_processes,
    read_jsonl,
    run_options,
    setup_run,
    write_jsonl,
)
from safetensors.numpy import load_file

from pipeline.checkpoint.checkpoints import consolidated_fp32_state_dict, step_of
from pipeline.cli.main import main
from pipeline.core.base import CLOSED_TO

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
    """The reference run as it would be if it had died right after saving step `last_step`: its
    checkpoints, metrics and evaluations up to that step, and none of the outputs written later
    (export, eval_results.json, predictions): the resumed run must write every one of them, so a
    resume that wrote nothing or the wrong thing cannot pass by the reference's copies."""
    shutil.copytree(reference, target, ignore=shutil.ignore_patterns("export", "eval_results.json", "predictions-*.jsonl"))
    for ckpt in (target / "checkpoints").glob("step-*"):
        if step_of(ckpt) > last_step:
            shutil.rmtree(ckpt)
    for evaluation in (target / "eval").glob("*.json"):
        if int(re.fullmatch(r".*-step-(\d+)\.json", evaluation.name).group(1)) > last_step:
            evaluation.unlink()
    write_jsonl(target / "metrics.jsonl", [row for row in read_jsonl(target / "metrics.jsonl") if row["step"] <= last_step])
    return target


@pytest.fixture(scope="module")
def reference(tmp_path_factory, small_data):
    """(run directory, DeepSpeed config) of RUN_ARGS under ZeRO-2 on 2 CPU ranks, tiny-bert with dropout."""
    tmp = tmp_path_factory.mktemp("ref-zero2")
    config = ds_config(tmp / "ds.json", 2, micro=4, accum=2, lr=3e-3)
    result = launch(train_args(config, small_data, tmp, "--run-name", "ref"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return tmp / "ref", config


def position(ckpt) -> tuple[int, int]:
    """(epoch, step in the epoch) a checkpoint resumes at."""
    state = json.loads((ckpt / "trainer_state.json").read_text())
    return state["epoch"], state["step_in_epoch"]


def kill_rank(launcher: subprocess.Popen, rank: int) -> None:
    for p in rank_processes(launcher.pid, rank):
        p.send_signal(signal.SIGKILL)


def start_paused_run(config, data, tmp_path, pause_at, *extra) -> tuple[subprocess.Popen, Path]:
    """A training run named 'killed' in the background, started, and waited for until its rank 0
    pauses at `pause_at` (the PIPELINE_TEST_PAUSE_AT stage: it then waits there for the kill); its
    console goes to PAUSE_AT.log. Returns (the job, that log)."""
    cmd = deepspeed_command(train_args(config, data, tmp_path, "--run-name", "killed", "--dist-timeout-minutes", "0.5", *extra))
    marker, log = tmp_path / f"paused-{pause_at}", tmp_path / f"{pause_at}.log"
    env = {**cpu_env(), "PIPELINE_TEST_PAUSE_AT": f"{pause_at}:{marker}"}
    job = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    deadline = time.time() + 240
    while not (marker.is_file() and marker.read_text()):  # rank 0's pid, once it pauses
        ended = job.poll() is not None
        assert not ended and time.time() < deadline, "the run never paused:\n" + log.read_text()[-3000:]
        time.sleep(0.1)
    return job, log


@pytest.mark.ranks
def test_sigkills_during_a_save_and_between_saves_then_resume_auto_is_exact(reference, small_data, tmp_path):
    """One run killed twice, each time resumed with `--resume auto`, ends exactly as if uninterrupted.
    1. Rank 1 killed while step 18's checkpoint is being written (rank 0 paused with its files
       written, its manifest not): the job fails fast, and the half-written checkpoint is never
       resumed from: the resume starts from step 16 (the epoch boundary, the data order's case).
    2. That resumed run's rank 0 killed before step 22's vote: step 21 is logged and evaluated,
       step 22's save has not begun. With metrics.jsonl left with a cut-short last line, the resume
       starts from step 20 (mid-epoch, where a restarted CPU Adam used to drift) and runs to the end.
    The final run's losses, export and predictions equal the uninterrupted reference's: every step
    after 16 comes from a resumed run."""
    ref, config = reference
    ckpts, metrics = tmp_path / "killed" / "checkpoints", tmp_path / "killed" / "metrics.jsonl"
    job, _ = start_paused_run(config, small_data, tmp_path, "saved-step-18")
    killed_at = time.time()
    kill_rank(job, 1)
    assert job.wait(timeout=60) != 0
    assert time.time() - killed_at < 60
    partial, newest_complete = ckpts / "step-18", ckpts / "step-16"
    assert [p for p in ckpts.glob("step-*") if not (p / "manifest.json").exists()] == [partial]
    assert (newest_complete / "manifest.json").exists() and position(newest_complete) == (1, 0)

    job, log = start_paused_run(config, small_data, tmp_path, "step-22", "--resume", "auto")
    kill_rank(job, 0)
    assert job.wait(timeout=60) != 0
    output = log.read_text()
    assert f"ignoring incomplete checkpoint {partial}" in output and f"resumed from {newest_complete}" in output
    assert max(row["step"] for row in read_jsonl(metrics)) == 21
    assert all((p / "manifest.json").exists() for p in ckpts.glob("step-*"))
    newest = max(ckpts.glob("step-*"), key=step_of)
    assert newest == ckpts / "step-20" and position(newest) == (1, 4)
    with open(metrics, "a", encoding="utf-8") as f:
        f.write('{"step": 99, "epoch": 1, "lo')  # a kill in the middle of writing a line

    result = launch(train_args(config, small_data, tmp_path, "--run-name", "killed", "--resume", "auto"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"{metrics}: dropped its incomplete last line" in result.stdout + result.stderr
    assert f"resumed from {newest}" in result.stdout
    assert_same_run(tmp_path / "killed", ref)


@pytest.mark.ranks
def test_every_file_of_a_run_follows_the_umask_and_file_access(reference):
    """Every rank's files (rank 1 writes its optimizer shards) are no more open than the umask and
    the default --file-access group allow: others get nothing."""
    run_dir, _ = reference
    mask = os.umask(0)
    os.umask(mask)
    # Read and write bits (DeepSpeed adds execute to its zero_to_fp32.py scripts).
    modes = {str(p.relative_to(run_dir)): p.stat().st_mode & 0o666 for p in run_dir.rglob("*") if p.is_file()}
    assert "export/model.safetensors" in modes and any("zero_pp_rank_1" in name for name in modes)
    assert {name: mode for name, mode in modes.items() if mode != 0o666 & ~(mask | CLOSED_TO["group"])} == {}


# ZeRO-3 and world-size changes, from a model without dropout (initial_model): 16 steps of 16
# records in one epoch, checkpoints every 2 steps. Resumed on the same ranks, a run is bit for bit
# the uninterrupted one; on another world size the only difference left is the order of
# floating-point reductions: losses and weights must agree to float32 rounding.
ACCUMULATION = {2: 2, 1: 4}  # 4 per rank x accumulation x ranks = 16
WORLD_ARGS = ("--epochs", "1")


@pytest.fixture(scope="module")
def world_reference(tmp_path_factory, initial_model, small_data):
    """world_reference(stage): (run directory, DeepSpeed config) of WORLD_ARGS from initial_model on 2 CPU ranks."""
    runs = {}

    def get(stage):
        if stage not in runs:
            tmp = tmp_path_factory.mktemp(f"world-zero{stage}")
            config = ds_config(tmp / "ds.json", stage, micro=4, accum=ACCUMULATION[2])
            result = launch(train_args(config, small_data, tmp, "--run-name", "ref", "--model", str(initial_model), *WORLD_ARGS))
            assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
            runs[stage] = tmp / "ref", config
        return runs[stage]

    return get


@pytest.mark.ranks
def test_resume_under_zero3_equals_uninterrupted(world_reference, initial_model, small_data, tmp_path):
    """Resumed mid-epoch from step 8 of ZeRO-3's partitioned state on the same 2 ranks, bit for bit:
    from step 8 the updates of a restarted DeepSpeed CPU Adam used to differ in the last bits (see
    checkpoint.replay_cpu_adam_steps). ZeRO-2's resumes, with dropout, at the epoch boundary and
    mid-epoch, are the SIGKILL test's."""
    ref, config = world_reference(3)
    copy = interrupted_copy(ref, tmp_path / "interrupted", 8)
    ckpt = copy / "checkpoints" / "step-8"
    resume = ("--run-name", "interrupted", "--resume", str(ckpt), "--model", str(initial_model))
    result = launch(train_args(config, small_data, tmp_path, *resume, *WORLD_ARGS))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert position(ckpt) == (0, 8)
    assert f"resumed from {ckpt}" in result.stdout
    assert_same_run(copy, ref)


@pytest.mark.ranks
def test_export_from_zero3_shards_reproduces_the_training_predictions(world_reference, small_data, tmp_path, capsys):
    """`export` and `predict` are one-process tools: called in this process, on a launched ZeRO-3 run."""
    ref, _ = world_reference(3)
    out = tmp_path / "exported"
    assert main(["export", str(ref / "checkpoints" / "step-16"), str(out)]) == 0
    # Into the run directory itself: refused, and nothing deleted.
    before = sorted(p.relative_to(ref) for p in ref.rglob("*"))
    capsys.readouterr()
    assert main(["export", str(ref / "checkpoints" / "step-16"), str(ref)]) == 2
    assert f"error: export: {ref} exists and is not an export" in capsys.readouterr().err
    assert sorted(p.relative_to(ref) for p in ref.rglob("*")) == before
    mine, theirs = load_file(out / "model.safetensors"), load_file(ref / "export" / "model.safetensors")
    assert mine.keys() == theirs.keys() and all((mine[k] == theirs[k]).all() for k in theirs)
    assert main(["predict", "--model", str(out), "--input", str(small_data["dev"])]) == 0
    labels = [json.loads(line)["label"] for line in capsys.readouterr().out.splitlines()]
    assert labels == [row["label"] for row in read_jsonl(ref / "predictions-dev.jsonl")]


@pytest.fixture(scope="module")
def two_to_one(world_reference, small_data, initial_model):
    """two_to_one(stage): (the 2-rank uninterrupted run, its copy interrupted at step 6 and resumed on
    1 rank with the 2-rank JSON, that launch's result)."""
    runs = {}

    def get(stage):
        if stage not in runs:
            ref, config = world_reference(stage)
            copy = interrupted_copy(ref, ref.parent / "interrupted", 6)
            resume = (
                "--run-name",
                "interrupted",
                "--resume",
                str(copy / "checkpoints" / "step-6"),
                "--model",
                str(initial_model),
            )
            result = launch(train_args(config, small_data, ref.parent, *resume, *WORLD_ARGS), ranks=1)
            runs[stage] = ref, copy, result
        return runs[stage]

    return get


def assert_resumed_on(world, stage, copy, ref, resumed_from, result) -> None:
    """The resumed run re-derived accumulation for `world` ranks, kept the global batch of 16, and
    ended where the uninterrupted run `ref` did, to float32 rounding."""
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert f"global batch kept at 16 = 4 x {ACCUMULATION[world]} accumulation x {world}" in output
    assert "not carried over: each rank's RNG state" in output
    resolved = json.loads((copy / "ds_config.json").read_text())
    assert (resolved["train_batch_size"], resolved["gradient_accumulation_steps"], resolved["world_size"]) == (
        16,
        ACCUMULATION[world],
        world,
    )
    assert resolved["zero_optimization"]["stage"] == stage
    assert (copy / "checkpoints" / f"step-{resumed_from}.universal").is_dir()
    resumed, reference_curve = losses(copy), losses(ref)
    assert len(resumed) == len(reference_curve) == 16
    assert max(abs(a - b) for a, b in zip(resumed, reference_curve)) < 1e-5, (resumed, reference_curve)
    mine, theirs = load_file(copy / "export" / "model.safetensors"), load_file(ref / "export" / "model.safetensors")
    assert max(abs(mine[k] - theirs[k]).max() for k in theirs) < 1e-5


@pytest.mark.ranks
@pytest.mark.parametrize("stage", [2, 3], ids=["zero2", "zero3"])
def test_resume_from_2_ranks_on_1_keeps_the_global_batch(two_to_one, stage):
    """ZeRO-2 (which DeepSpeed's own universal-checkpoint tests do not cover) and ZeRO-3, through the
    universal format; the same JSON on the new world size: the run must re-derive accumulation."""
    ref, copy, result = two_to_one(stage)
    assert_resumed_on(1, stage, copy, ref, 6, result)


@pytest.mark.ranks
def test_resume_from_1_rank_on_2_keeps_the_global_batch(two_to_one, initial_model, small_data, tmp_path):
    """ZeRO-2 the other way: step 10 of the 1-rank leg above (its checkpoints from step 8 on written
    by one rank), resumed on 2 ranks with that leg's 1-rank JSON (accumulation 4)."""
    ref, one_rank_run, _ = two_to_one(2)
    assert json.loads((one_rank_run / "ds_config.json").read_text())["world_size"] == 1
    copy = interrupted_copy(one_rank_run, tmp_path / "interrupted", 10)
    config = ds_config(tmp_path / "ds.json", 2, micro=4, accum=ACCUMULATION[1])
    resume = ("--run-name", "interrupted", "--resume", str(copy / "checkpoints" / "step-10"), "--model", str(initial_model))
    result = launch(train_args(config, small_data, tmp_path, *resume, *WORLD_ARGS))
    assert_resumed_on(2, 2, copy, ref, 10, result)


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


@pytest.mark.ranks
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


@pytest.mark.ranks
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
    args = ["train", "--ds-config", str(config), *run_options(small_data, tmp_path), *EARLY_STOP_SETTINGS]
    result = launch([*args, "--resume", str(copy / "checkpoints" / f"step-{last_step}")])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"early stopping after step {stop}:" in result.stdout
    assert json.loads((copy / "eval_results.json").read_text())["step"] == best
    assert_same_run(copy, ref)


# Resumes that ranks do not change (the branch a resume abandons, a new learning rate, a finished run,
# a refusal of other data) run on the in-process engine of one rank (the one_rank fixture): a run
# that finishes all 4 steps with a dev evaluation and a checkpoint every 2; patience 1 makes a final
# evaluation counted twice (a resumed finished run) end it "early".
BRANCH_SETTINGS = dict(
    max_length=32,
    max_steps=4,
    epochs=2,
    eval_every=2,
    save_every=2,
    keep_checkpoints=10,
    best_metric="macro_f1",
    early_stopping_patience=1,
)


class PipelineLog(logging.Handler):
    """The lines the pipeline's logger writes while installed (its console handler keeps the stdout
    of the test that first used it, which capsys does not see)."""

    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())

    def __enter__(self):
        logging.getLogger("pipeline").addHandler(self)
        return self

    def __exit__(self, *exc):
        logging.getLogger("pipeline").removeHandler(self)

    def text(self) -> str:
        return "\n".join(self.lines)


def run_in_process(one_rank, out, lr=1e-3, **options) -> Path:
    """A run named 'run' in `out` of BRANCH_SETTINGS (and `options`: resume=...) on one rank in this
    process, trained, evaluated, checkpointed and exported as `train` does; returns its directory."""
    run = setup_run(one_rank, out, micro=4, accum=2, lr=lr, **{**BRANCH_SETTINGS, **options})
    run.train()
    run.finish()
    return out / "run"


@pytest.fixture(scope="module")
def finished(one_rank, tmp_path_factory):
    """The run directory of BRANCH_SETTINGS at lr 1e-3 (64 records, 8 steps per epoch)."""
    return run_in_process(one_rank, tmp_path_factory.mktemp("finished"))


def resume_copy(run_dir, one_rank, tmp_path, resume, lr=1e-3) -> tuple[Path, str]:
    """Resume a copy of `run_dir` (as tmp_path/run) from `resume` ("auto" or a checkpoint name,
    "step-N") at `lr`; returns (the copy, what the pipeline logged). The copy has none of the
    finished run's outputs (export, eval_results.json, predictions): what a test reads of them is the
    resumed run's."""
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("export", "eval_results.json", "predictions-*.jsonl"))
    where = resume if resume == "auto" else str(copy / "checkpoints" / resume)
    with PipelineLog() as log:
        run_in_process(one_rank, tmp_path, lr=lr, resume=where)
    return copy, log.text()


@pytest.fixture(scope="module")
def branched(finished, one_rank, tmp_path_factory):
    """(run directory, log) of the finished run resumed from its step 2 with a new learning rate
    (4e-3): one run for the two tests of resuming an older checkpoint."""
    return resume_copy(finished, one_rank, tmp_path_factory.mktemp("branched"), "step-2", lr=4e-3)


def test_resuming_an_older_checkpoint_owns_the_later_steps(branched):
    """Resumed from step 2 (to go on another way): the old step 4 is moved aside, named; the new
    step 4 is saved, with other weights (the new learning rate); the export holds this run's weights."""
    copy, log = branched
    (aside,) = (copy / "checkpoints").glob("superseded-after-step-2-*")
    assert f"moved aside to {aside}" in log
    assert (aside / "step-4" / "manifest.json").is_file() and (copy / "checkpoints" / "step-4" / "manifest.json").is_file()
    old, new = consolidated_fp32_state_dict(aside / "step-4"), consolidated_fp32_state_dict(copy / "checkpoints" / "step-4")
    assert any((old[k] != new[k]).any() for k in new)
    exported = json.loads((copy / "eval_results.json").read_text())["step"]
    mine = load_file(copy / "export" / "model.safetensors")
    theirs = consolidated_fp32_state_dict(copy / "checkpoints" / f"step-{exported}")
    assert all((mine[k] == theirs[k].numpy()).all() for k in theirs)


def test_a_new_learning_rate_on_resume_is_applied_and_said(branched):
    copy, log = branched
    assert [row["lr"] for row in read_jsonl(copy / "metrics.jsonl") if "split" not in row] == [1e-3, 1e-3, 4e-3, 4e-3]
    assert "resumed optimizer: lr 0.001 -> 0.004 (this run's DeepSpeed config applies, not the checkpoint's)" in log


def test_resuming_a_finished_run_counts_its_final_evaluation_once(finished, one_rank, tmp_path):
    results = json.loads((finished / "eval_results.json").read_text())
    assert results["stopped_early"] is False and results["last_step"] == 4  # it ran all its steps
    copy, log = resume_copy(finished, one_rank, tmp_path, "auto")
    assert "early stopping" not in log
    assert json.loads((copy / "eval_results.json").read_text()) == results


def test_resume_on_changed_training_data_is_refused(finished, one_rank, tmp_path, capsys):
    """Fewer records put the saved position (step 2 of 8) beyond the new epoch's end (1 step):
    without a check the loop got no batches and spun forever, calling no collective that could time
    out. The refusal comes before the engine is built: `train` in this process. (The checkpoint's own
    tokenizer is given as the model, so the vocabulary, which would otherwise be rebuilt from the new
    data, does not change.)"""
    copy = interrupted_copy(finished, tmp_path / "interrupted", 2)
    ckpt = copy / "checkpoints" / "step-2"
    fewer = write_jsonl(tmp_path / "train.jsonl", read_jsonl(one_rank["train"])[:8])
    config = ds_config(tmp_path / "ds.json", 2, micro=4, accum=2)
    # Their own dev set: the 16 dev records have labels that 8 training records lack.
    args = ["train", "--ds-config", str(config), "--train-file", str(fewer), "--dev-file", str(fewer)]
    args += [
        "--output-dir",
        str(tmp_path),
        "--cache-dir",
        str(tmp_path / "cache"),
        "--resume",
        str(ckpt),
        "--model",
        str(ckpt / "hf"),
    ]
    args += [f"--{key.replace('_', '-')}={value}" for key, value in BRANCH_SETTINGS.items()]
    assert main([*args, "--baseline", "none", "--report-to", "none"]) == 2
    err = capsys.readouterr().err
    assert "the training data differs from the checkpoint's" in err
    assert "train records 64 -> 8" in err and "Traceback" not in err


def test_an_export_that_cannot_delete_the_earlier_one_keeps_one_in_place(finished, tmp_path, monkeypatch):
    """Files busy on NFS: the earlier export (step 2's), once renamed aside, cannot be deleted
    entirely. The new export (step 4's) is in place, complete, and the call succeeds; what is left of
    the old one stays aside, under its own name."""
    from pipeline.checkpoint import export as export_module

    run_dir = finished
    step_2, step_4 = (consolidated_fp32_state_dict(run_dir / "checkpoints" / f"step-{n}") for n in (2, 4))
    assert any((step_2[k] != step_4[k]).any() for k in step_4)  # so the weights tell which export is in place
    target = export_module.export_checkpoint(run_dir / "checkpoints" / "step-2", tmp_path / "export")
    real_rmtree = shutil.rmtree

    def busy_rmtree(path, ignore_errors=False):
        if ".tmp" in str(path):
            return real_rmtree(path, ignore_errors=ignore_errors)
        (Path(path) / "model.safetensors").unlink(missing_ok=True)  # deleted part of it, then
        if not ignore_errors:
            raise OSError(16, "Device or resource busy", str(path))

    monkeypatch.setattr(export_module.shutil, "rmtree", busy_rmtree)
    assert export_module.export_checkpoint(run_dir / "checkpoints" / "step-4", target, overwrite=True) == target
    assert export_module.is_export(target)
    export_module.check_export_weights(target)
    weights = load_file(target / "model.safetensors")
    assert weights.keys() == step_4.keys() and all((weights[k] == step_4[k].numpy()).all() for k in step_4)
    (left,) = tmp_path.glob("export.old*")
    assert not (left / "model.safetensors").exists()  # the part the busy file system did delete


@pytest.mark.ranks
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
