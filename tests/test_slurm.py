"""Training under a real SLURM (munged, slurmctld, slurmd on this machine): the shipped template's
job trains like the deepspeed launcher: signalled mid-run it checkpoints, requeues itself and ends
with the uninterrupted run's losses and weights, as does a job requeued (killed) mid-run; a job at its time
limit saves on the signal sent ahead; what does not fit the allocation is refused before training.
The jobs run with the reference's settings (STOP_SETTINGS and the cheap defaults, as `uninterrupted`
was trained), so their weights must equal its weights exactly; the signal and the kill come while
rank 0 is held at a pause hook (PIPELINE_TEST_PAUSE_AT), at a chosen step, not whenever a poll sees one."""

import re
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import CHEAP, REPO, STOP_SETTINGS, ds_config, free_port, losses, note_launch, read_jsonl, run_options
from safetensors.numpy import load_file

from pipeline.checkpoint.checkpoints import verify_manifest
from pipeline.core.base import ConfigError
from pipeline.launch import launcher
from pipeline.launch.launcher import check_slurm_gpus

TEMPLATE = REPO / "hostfiles" / "slurm-v100x8.sbatch"


def job_script(tmp_path, body: str):
    path = tmp_path / "job.sh"
    path.write_text("#!/bin/bash\n#SBATCH --ntasks=2\n" + body)
    return path


def run_args(tmp_path, data, config):
    """The training options of the `uninterrupted` reference (launch.sh through srun, not the test
    helpers, so CHEAP is given here), with this job's own output directory and port."""
    return ["--ds-config", str(config), "--master-port", str(free_port()), *CHEAP, *run_options(data, tmp_path), *STOP_SETTINGS]


def submit(slurm, tmp_path, *args, env=()) -> str:
    """`sbatch ARGS` with its output in job.out (and `env` for the job); returns the job id."""
    note_launch("sbatch")
    submitted = subprocess.run(
        ["sbatch", "--parsable", "-o", str(tmp_path / "job.out"), *args],
        cwd=REPO,
        env={**slurm, **dict(env)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert submitted.returncode == 0, submitted.stderr
    return submitted.stdout.strip().split(";")[0]


def wait_until_gone(slurm, job: str, tmp_path) -> tuple[int, str]:
    """(exit code, output) of the job once it has left the queue (a requeued job comes back first).
    Not `sbatch --wait`: it polls every 2, 8, then 32 s, and returned 13 s after a 28 s job ended."""
    deadline = time.monotonic() + 480
    while subprocess.run(["squeue", "-h", "-j", job], env=slurm, capture_output=True, text=True).stdout.strip():
        assert time.monotonic() < deadline, (tmp_path / "job.out").read_text()[-4000:]
        time.sleep(0.5)
    shown = subprocess.run(["scontrol", "show", "job", "-o", job], env=slurm, capture_output=True, text=True).stdout
    output = (tmp_path / "job.out").read_text(errors="replace")  # a killed rank may have cut a character in two
    return int(re.search(r"\bExitCode=(\d+):", shown)[1]), output


def run_job(slurm, tmp_path, command: str, *sbatch_args) -> tuple[int, str]:
    """A 2-task job running `command`, to its end: (exit code, output)."""
    job = submit(slurm, tmp_path, *sbatch_args, str(job_script(tmp_path, command + "\n")))
    return wait_until_gone(slurm, job, tmp_path)


def submit_template(slurm, tmp_path, data, config, pause_at: str) -> tuple[str, Path]:
    """The shipped template (GPU lines dropped) on 2 tasks, rank 0 pausing at `pause_at` (the hook's
    stage); returns the job id and the hook's marker. A requeued job pauses there again if it gets there."""
    script = tmp_path / "job.sbatch"
    script.write_text(
        "".join(
            line
            for line in TEMPLATE.read_text().splitlines(keepends=True)
            if "--gpus-per-node" not in line and "--cpus-per-task" not in line
        )
    )
    marker = tmp_path / "paused"
    job = submit(
        slurm,
        tmp_path,
        "--nodes=1",
        "--ntasks-per-node=2",
        str(script),
        *run_args(tmp_path, data, config),
        env={"PIPELINE_TEST_PAUSE_AT": f"{pause_at}:{marker}"},
    )
    return job, marker


def wait_for(tmp_path, what: str, ready) -> None:
    deadline = time.monotonic() + 240
    while not ready():
        assert time.monotonic() < deadline, f"no {what}:\n" + (tmp_path / "job.out").read_text(errors="replace")[-4000:]
        time.sleep(0.2)


def wait_until_paused(marker, tmp_path, other_than: str = "") -> str:
    """The pid of the rank 0 that holds at the hook (one other than `other_than`, a killed one's)."""
    wait_for(tmp_path, "pause", lambda: marker.is_file() and marker.read_text() not in ("", other_than))
    return marker.read_text()


def assert_ends_like(run_dir, expected) -> None:
    """Bit-exact losses and weights, as the CPU allows, and every step logged once."""
    assert losses(run_dir) == losses(expected)
    ours, theirs = load_file(run_dir / "export" / "model.safetensors"), load_file(expected / "export" / "model.safetensors")
    assert all(np.array_equal(ours[k], theirs[k]) for k in theirs)
    assert [row["step"] for row in read_jsonl(run_dir / "metrics.jsonl") if "split" not in row] == list(range(1, 13))


@pytest.mark.cluster
def test_signalled_job_checkpoints_requeues_and_ends_like_an_uninterrupted_run(slurm, uninterrupted, small_data, tmp_path):
    """The shipped template trains like the deepspeed launcher (two srun tasks, ranks from
    SLURM_PROCID): USR1 mid-run -> checkpoint, exit 75, the template requeues, the job resumes and
    ends with the uninterrupted run's losses and exported weights."""
    config, expected = uninterrupted
    job, marker = submit_template(slurm, tmp_path, small_data, config, "step-6")  # past the step-4 checkpoint
    wait_until_paused(marker, tmp_path)
    subprocess.run(["scancel", "--signal=USR1", job], env=slurm, check=True)
    wait_for(tmp_path, "signal on rank 0", lambda: "[rank 0] SIGUSR1" in (tmp_path / "job.out").read_text(errors="replace"))
    marker.unlink()  # rank 0 votes to stop in step 6's all-reduce
    _, output = wait_until_gone(slurm, job, tmp_path)
    stopped = [line for line in output.splitlines() if line.startswith("stopped on request after optimizer step")]
    assert len(stopped) == 1 and "exited with exit code 75" in output.lower(), output[-4000:]
    assert stopped[0].startswith("stopped on request after optimizer step 6:"), stopped
    assert f"resumed from {tmp_path / 'run' / 'checkpoints' / 'step-6'}" in output, output[-4000:]
    assert output.count("rank 0 of 2:") == 2 and output.count("rank 1 of 2:") == 2, output[-4000:]  # each start
    assert len(losses(expected)) == 12
    assert_ends_like(tmp_path / "run", expected)


@pytest.mark.cluster
def test_a_job_requeued_mid_run_resumes_from_its_last_complete_checkpoint(slurm, uninterrupted, small_data, tmp_path):
    """`scontrol requeue`: the kill-and-requeue path a preemption with PreemptMode=REQUEUE takes. The
    ranks are killed without a stop before step 6's vote; the requeued job resumes from the newest
    complete checkpoint, step 4's."""
    config, expected = uninterrupted
    job, marker = submit_template(slurm, tmp_path, small_data, config, "step-6")
    killed = wait_until_paused(marker, tmp_path)
    subprocess.run(["scontrol", "requeue", job], env=slurm, check=True)
    wait_until_paused(marker, tmp_path, other_than=killed)  # the requeued job, at step 6 again
    marker.unlink()
    _, output = wait_until_gone(slurm, job, tmp_path)
    assert "stopped on request" not in output, output[-4000:]
    resumed = re.findall(r"^resumed from (\S+):", output, re.MULTILINE)
    assert resumed == [str(tmp_path / "run" / "checkpoints" / "step-4")], output[-4000:]
    assert_ends_like(tmp_path / "run", expected)


@pytest.mark.cluster
def test_a_job_at_its_time_limit_saves_on_the_signal_sent_ahead_of_it(slurm, small_data, tmp_path):
    """--time=2 with --signal=USR1@50: SLURM signals the ranks when 50 s remain, on its time-limit
    check every 30 s (measured: @60 of --time=2 at 58 s, @90 of --time=3 at 89 s), 70-100 s in, long
    after training has started; they stop after the step and save, and the job ends with 75 before
    the limit kills it. --rank-logs names a directory that does not exist yet."""
    config = ds_config(tmp_path / "ds.json", 2, micro=4, accum=2)
    endless = ["--max-length", "64", "--epochs", "1000", "--eval-every", "100000", "--save-every", "100000"]
    logs = tmp_path / "logs" / "ranks"  # created by launch.sh: srun would not
    options = ["--ds-config", str(config), "--master-port", str(free_port()), "--rank-logs", str(logs)]
    options += [*CHEAP, *run_options(small_data, tmp_path), *endless]
    code, output = run_job(slurm, tmp_path, f"./launch.sh --launcher slurm {' '.join(options)}", "--time=2", "--signal=USR1@50")
    output += "".join(log.read_text() for log in sorted(logs.glob("rank-*.log")))
    assert code == 75, output[-4000:]
    assert sorted(log.name for log in logs.iterdir()) == ["rank-0.log", "rank-1.log"]
    assert "SIGUSR1: stopping after this optimizer step" in output, output[-4000:]
    (step,) = re.findall(r"stopped on request after optimizer step (\d+)", output)  # after a progress bar's \r
    verify_manifest(tmp_path / "run" / "checkpoints" / f"step-{step}")  # complete: a resume would take it


@pytest.mark.cluster
def test_a_batch_config_that_does_not_fit_the_allocation_is_refused_before_training(slurm, small_data, tmp_path):
    config = ds_config(tmp_path / "ds.json", 2, micro=4, accum=2, train_batch_size=12)  # 12 != 4 x 2 x 2 ranks
    code, output = run_job(slurm, tmp_path, f"./launch.sh --launcher slurm {' '.join(run_args(tmp_path, small_data, config))}")
    assert code != 0
    assert "launch: error:" in output and "train_batch_size (12) must equal" in output, output[-3000:]
    assert "rank 0 of" not in output  # no rank ever started


def test_launcher_slurm_outside_an_allocation_or_with_a_hostfile_is_an_error(monkeypatch, capsys, tmp_path):
    """Refused in the launcher before the doctor or any rank starts (called in this process)."""
    import os

    for key in [key for key in os.environ if key.startswith("SLURM_")]:
        monkeypatch.delenv(key)
    assert launcher.main(["--launcher", "slurm", *CHEAP, "--output-dir", str(tmp_path)]) == 2
    assert "launch: error: --launcher slurm outside a SLURM allocation" in capsys.readouterr().err
    monkeypatch.setenv("SLURM_JOB_ID", "1")
    hostfile = str(REPO / "hostfiles" / "localhost")
    assert launcher.main(["--launcher", "slurm", "--hostfile", hostfile, *CHEAP, "--output-dir", str(tmp_path)]) == 2
    assert "launch: error: --hostfile with --launcher slurm" in capsys.readouterr().err


def test_gpus_per_node_must_equal_tasks_per_node():
    check_slurm_gpus({"gpu1": 8}, {"gpu1": {"gpus": 8}}, "cuda")
    check_slurm_gpus({"gpu1": 2}, {"gpu1": {"gpus": 0}}, "cpu")  # CPU ranks: no GPUs to match
    with pytest.raises(ConfigError, match="gives gpu1 4 GPUs but 8 tasks: this pipeline runs one task per GPU"):
        check_slurm_gpus({"gpu1": 8}, {"gpu1": {"gpus": 4}}, "cuda")
