"""Graceful stop under ./launch.sh (pdsh/local runner): the first Ctrl-C finishes the optimizer step,
saves a checkpoint and exits 75, and the resumed run equals an uninterrupted one; a second Ctrl-C aborts."""

import json
import os
import signal
import subprocess
import time

import numpy as np
import pytest
from helpers import (
    REPO,
    SAMPLE,
    STOP_SETTINGS,
    cpu_env,
    ds_config,
    free_port,
    launch,
    launch_sh_command,
    losses,
    read_jsonl,
    run_options,
    steps_logged,
    write_jsonl,
)
from safetensors.numpy import load_file

pytestmark = pytest.mark.ranks  # every test here launches ranks or trains

EXIT_STOPPED = 75


def start(tmp_path, data, config, extra=(), env=None):
    cmd = launch_sh_command(
        "--ds-config", str(config), "--master-port", str(free_port()), *run_options(data, tmp_path), *STOP_SETTINGS, *extra
    )
    console = open(tmp_path / "console.txt", "w")
    return subprocess.Popen(cmd, cwd=REPO, env={**cpu_env(), **(env or {})}, stdout=console, stderr=subprocess.STDOUT)


def wait_for_steps(job, tmp_path, steps: int) -> None:
    deadline = time.monotonic() + 240
    while steps_logged(tmp_path / "run") < steps:
        assert job.poll() is None and time.monotonic() < deadline, (tmp_path / "console.txt").read_text()[-4000:]
        time.sleep(0.2)


def test_a_second_ctrl_c_aborts(small_data, tmp_path):
    """Long optimizer steps (8 x 8 records of up to 512 tokens per rank): the second Ctrl-C comes mid-step."""
    config = ds_config(tmp_path / "ds.json", 2, micro=8, accum=8)
    job = start(tmp_path, small_data, config, extra=["--max-length", "512", "--max-steps", "200", "--epochs", "100"])
    wait_for_steps(job, tmp_path, 1)
    job.send_signal(signal.SIGINT)
    time.sleep(0.5)
    job.send_signal(signal.SIGINT)
    code = job.wait(timeout=120)
    console = (tmp_path / "console.txt").read_text()
    assert code not in (0, EXIT_STOPPED), console[-3000:]
    assert "stopped on request" not in console and not (tmp_path / "run" / "checkpoints").exists()


def signal_at(job, tmp_path, marker, while_paused=lambda: None) -> None:
    """Wait until rank 0 pauses at the test hook's stage (PIPELINE_TEST_PAUSE_AT), call `while_paused`,
    send it SIGUSR1, let it go on."""
    deadline = time.monotonic() + 240
    while not (marker.is_file() and marker.read_text()):
        assert job.poll() is None and time.monotonic() < deadline, (tmp_path / "console.txt").read_text()[-4000:]
        time.sleep(0.2)
    while_paused()
    os.kill(int(marker.read_text()), signal.SIGUSR1)
    marker.unlink()


def test_ctrl_c_and_stops_at_step_boundaries_save_and_the_resumed_run_equals_an_uninterrupted_one(
    uninterrupted, small_data, tmp_path
):
    """One run stopped three times and resumed with --resume auto each time: Ctrl-C to launch.sh
    after step 3 (the step it is in ends, its checkpoint is saved, exit 75); SIGUSR1 to rank 0 held
    at step 8's boundary, where an evaluation is due (saved without it: the resumed run evaluates);
    SIGUSR1 at the last step, 12 (not dropped). The last resume finishes, and the whole run equals an
    uninterrupted one: the same losses, evaluations and exported weights."""
    config, expected = uninterrupted
    run = tmp_path / "run"

    def stopped_at(job, step=None) -> int:
        code = job.wait(timeout=240)
        console = (tmp_path / "console.txt").read_text()
        assert code == EXIT_STOPPED and "Traceback" not in console, console[-4000:]
        said = int(console.split("stopped on request after optimizer step ")[1].split(":")[0])
        assert step in (None, said), console[-4000:]
        assert f"checkpoint {run / 'checkpoints' / f'step-{said}'} saved" in console
        assert max(int(p.name.split("-")[1]) for p in (run / "checkpoints").glob("step-*")) == said
        assert (run / "checkpoints" / f"step-{said}" / "manifest.json").is_file()
        assert [row["step"] for row in read_jsonl(run / "metrics.jsonl") if "split" not in row] == list(range(1, said + 1))
        return said

    job = start(tmp_path, small_data, config)
    wait_for_steps(job, tmp_path, 3)
    job.send_signal(signal.SIGINT)  # the terminal's Ctrl-C reaches launch.sh alone: the runner has its own session
    step = stopped_at(job)
    assert step < 8, step
    assert "launch: stopping after the current optimizer step" in (tmp_path / "console.txt").read_text()
    assert not list(tmp_path.glob(".stop-request-*"))  # the launcher removed its stop file

    for step, marker in ((8, tmp_path / "paused-8"), (12, tmp_path / "paused-12")):
        job = start(tmp_path, small_data, config, ["--resume", "auto"], env={"PIPELINE_TEST_PAUSE_AT": f"step-{step}:{marker}"})
        signal_at(job, tmp_path, marker)
        stopped_at(job, step)
        if step == 8:  # the evaluation due at step 8 is left to the resumed run
            assert not (run / "eval" / "dev-step-8.json").exists()

    resumed = launch(
        ["train", "--ds-config", str(config), *run_options(small_data, tmp_path), *STOP_SETTINGS, "--resume", "auto"]
    )
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"resumed from {run / 'checkpoints' / 'step-12'}" in resumed.stdout
    assert json.loads((run / "eval_results.json").read_text())["last_step"] == 12
    assert [row["step"] for row in read_jsonl(run / "metrics.jsonl") if row.get("split") == "dev"] == [4, 8, 12]
    assert losses(run) == losses(expected)
    ours, theirs = load_file(run / "export" / "model.safetensors"), load_file(expected / "export" / "model.safetensors")
    assert all(np.array_equal(ours[k], theirs[k]) for k in theirs)
    assert [row["step"] for row in read_jsonl(run / "metrics.jsonl") if "split" not in row] == list(range(1, 13))


@pytest.mark.parametrize(
    "stage, extra, step",
    [
        ("data", [], None),  # before the first step: exit 75, nothing to save
        ("evaluate", ["--eval-every", "2"], 2),  # a dev evaluation with no save due: saved right after it
        ("save", [], 4),  # the save at step 4: no step 5, no second save
    ],
)
def test_a_stop_at_any_stage_ends_in_a_checkpoint_within_one_step_and_one_save(small_data, tmp_path, stage, extra, step):
    """SIGUSR1 to rank 0 at a stage outside the step boundary (held there by the test hook): every rank
    exits 75, with the checkpoint of the step it was in (before the first step: nothing), no traceback."""
    config, marker = ds_config(tmp_path / "ds.json", 2, micro=4, accum=2), tmp_path / "paused"
    job = start(tmp_path, small_data, config, extra, env={"PIPELINE_TEST_PAUSE_AT": f"{stage}:{marker}"})
    signal_at(job, tmp_path, marker)
    code = job.wait(timeout=240)
    console = (tmp_path / "console.txt").read_text()
    assert code == EXIT_STOPPED and "Traceback" not in console, console[-4000:]
    run = tmp_path / "run"
    if step is None:
        assert "stopped on request during data preparation, before the first optimizer step: nothing to save" in console
        assert not (run / "checkpoints").exists() and not (run / "metrics.jsonl").exists()
        return
    assert f"stopped on request after optimizer step {step}: checkpoint {run / 'checkpoints' / f'step-{step}'} saved" in console
    assert max(int(p.name.split("-")[1]) for p in (run / "checkpoints").glob("step-*")) == step
    assert (run / "checkpoints" / f"step-{step}" / "manifest.json").is_file()
    assert [row["step"] for row in read_jsonl(run / "metrics.jsonl") if "split" not in row] == list(range(1, step + 1))


def test_a_stop_while_rank_0_tokenizes_ends_the_preparation_at_once(small_data, tmp_path):
    """3,000 training records take three tokenizer batches: SIGUSR1 after the first ends the data
    preparation there, every rank exits 75, and no half-built cache is left. Not after the whole
    file: while rank 0 is held after the first batch the last record is rewritten, which reading on
    to the end would refuse ("the file changed while it was read", exit 2)."""
    rows = read_jsonl(SAMPLE / "train.jsonl")
    big = write_jsonl(
        tmp_path / "big.jsonl", [{**row, "text": f"{row['text']} 第{i}例"} for i, row in enumerate((rows * 3)[:3000])]
    )

    def rewrite_the_last_record():
        data = big.read_bytes()
        assert "第2999例".encode() in data[-500:]  # in the last record, far past the first batch's bytes
        big.write_bytes(data.replace("第2999例".encode(), "第9999例".encode()))

    config, marker = ds_config(tmp_path / "ds.json", 2, micro=4, accum=2), tmp_path / "paused"
    job = start(tmp_path, {**small_data, "train": big}, config, env={"PIPELINE_TEST_PAUSE_AT": f"tokenize:{marker}"})
    signal_at(job, tmp_path, marker, while_paused=rewrite_the_last_record)
    code = job.wait(timeout=240)
    console = (tmp_path / "console.txt").read_text()
    assert code == EXIT_STOPPED and "Traceback" not in console, console[-4000:]
    assert "changed while it was read" not in console
    assert console.count("stopped on request during data preparation, before the first optimizer step: nothing to save") >= 1
    assert not list((tmp_path / "cache").glob("tokenized-big-*")), list((tmp_path / "cache").iterdir())
