"""Training under a real SLURM (munged, slurmctld, slurmd on this machine): an sbatch job trains like
the deepspeed launcher; a job signalled mid-run checkpoints, requeues itself and ends with the
uninterrupted run's losses and weights, as does a job requeued (killed) mid-run; a job at its time
limit saves on the signal sent ahead; what does not fit the allocation is refused before training."""

import re
import subprocess
import time

import numpy as np
import pytest
from helpers import REPO, STOP_SETTINGS, ds_config, free_port, launch_sh_command, losses, read_jsonl, run_options, steps_logged
from safetensors.numpy import load_file

from pipeline.checkpoint.checkpoints import verify_manifest
from pipeline.core.base import ConfigError
from pipeline.launch.launcher import check_slurm_gpus

TEMPLATE = REPO / "hostfiles" / "slurm-v100x8.sbatch"


def job_script(tmp_path, body: str):
    path = tmp_path / "job.sh"
    path.write_text("#!/bin/bash\n#SBATCH --ntasks=2\n" + body)
    return path


def run_args(tmp_path, data, config):
    return [
        "--ds-config",
        str(config),
        "--master-port",
        str(free_port()),
        *run_options(data, tmp_path),
        *STOP_SETTINGS,
    ]


def sbatch(slurm, *args) -> subprocess.CompletedProcess:
    return subprocess.run(["sbatch", *args], cwd=REPO, env=slurm, capture_output=True, text=True, timeout=600)


@pytest.mark.cluster
def test_sbatch_job_trains_like_the_deepspeed_launcher(slurm, uninterrupted, small_data, tmp_path):
    config, expected = uninterrupted
    script = job_script(tmp_path, f"./launch.sh --launcher slurm {' '.join(run_args(tmp_path, small_data, config))}\n")
    result = sbatch(slurm, "--wait", "-o", str(tmp_path / "job.out"), str(script))
    output = (tmp_path / "job.out").read_text()
    assert result.returncode == 0, output[-4000:]
    assert "rank 0 of 2:" in output and "rank 1 of 2:" in output  # two srun tasks, ranks from SLURM_PROCID
    assert losses(tmp_path / "run") == losses(expected) and len(losses(expected)) == 12
    assert (tmp_path / "run" / "export" / "model.safetensors").is_file()


def submit_template(slurm, tmp_path, data, config) -> str:
    """The shipped template (GPU lines dropped) on 2 tasks; returns the job id."""
    script = tmp_path / "job.sbatch"
    script.write_text(
        "".join(
            line
            for line in TEMPLATE.read_text().splitlines(keepends=True)
            if "--gpus-per-node" not in line and "--cpus-per-task" not in line
        )
    )
    submitted = sbatch(
        slurm,
        "--parsable",
        "--nodes=1",
        "--ntasks-per-node=2",
        "-o",
        str(tmp_path / "job.out"),
        str(script),
        *run_args(tmp_path, data, config),
    )
    assert submitted.returncode == 0, submitted.stderr
    return submitted.stdout.strip().split(";")[0]


def wait_past_first_checkpoint(tmp_path) -> None:
    deadline = time.monotonic() + 240
    while steps_logged(tmp_path / "run") < 5:  # past the step-4 checkpoint
        assert time.monotonic() < deadline, (tmp_path / "job.out").read_text()[-4000:]
        time.sleep(0.3)


def wait_until_gone(slurm, job: str, tmp_path) -> str:
    """The job's output once it has left the queue (a requeued job comes back first)."""
    deadline = time.monotonic() + 480
    while subprocess.run(["squeue", "-h", "-j", job], env=slurm, capture_output=True, text=True).stdout.strip():
        assert time.monotonic() < deadline, (tmp_path / "job.out").read_text()[-4000:]
        time.sleep(1)
    return (tmp_path / "job.out").read_text(errors="replace")  # a killed rank may have cut a character in two


def assert_ends_like(run_dir, expected) -> None:
    """Bit-exact losses and weights, as the CPU allows, and every step logged once."""
    assert losses(run_dir) == losses(expected)
    ours, theirs = load_file(run_dir / "export" / "model.safetensors"), load_file(expected / "export" / "model.safetensors")
    assert all(np.array_equal(ours[k], theirs[k]) for k in theirs)
    assert [row["step"] for row in read_jsonl(run_dir / "metrics.jsonl") if "split" not in row] == list(range(1, 13))


@pytest.mark.cluster
def test_signalled_job_checkpoints_requeues_and_ends_like_an_uninterrupted_run(slurm, uninterrupted, small_data, tmp_path):
    """USR1 mid-run -> checkpoint, exit 75, the template requeues, the job resumes."""
    config, expected = uninterrupted
    job = submit_template(slurm, tmp_path, small_data, config)
    wait_past_first_checkpoint(tmp_path)
    subprocess.run(["scancel", "--signal=USR1", job], env=slurm, check=True)
    output = wait_until_gone(slurm, job, tmp_path)
    stopped = [line for line in output.splitlines() if line.startswith("stopped on request after optimizer step")]
    assert len(stopped) == 1 and "exited with exit code 75" in output.lower(), output[-4000:]
    step = int(stopped[0].split("optimizer step ")[1].split(":")[0])
    assert 5 <= step < 12
    assert f"resumed from {tmp_path / 'run' / 'checkpoints' / f'step-{step}'}" in output, output[-4000:]
    assert_ends_like(tmp_path / "run", expected)


@pytest.mark.cluster
def test_a_job_requeued_mid_run_resumes_from_its_last_complete_checkpoint(slurm, uninterrupted, small_data, tmp_path):
    """`scontrol requeue`: the kill-and-requeue path a preemption with PreemptMode=REQUEUE takes. The
    ranks are killed without a stop; the requeued job resumes from the newest complete checkpoint."""
    config, expected = uninterrupted
    job = submit_template(slurm, tmp_path, small_data, config)
    wait_past_first_checkpoint(tmp_path)
    subprocess.run(["scontrol", "requeue", job], env=slurm, check=True)
    output = wait_until_gone(slurm, job, tmp_path)
    assert "stopped on request" not in output, output[-4000:]
    resumed = re.findall(r"^resumed from (\S+):", output, re.MULTILINE)
    assert resumed in ([str(tmp_path / "run" / "checkpoints" / f"step-{step}")] for step in (4, 8)), output[-4000:]
    assert_ends_like(tmp_path / "run", expected)


@pytest.mark.cluster
def test_a_job_at_its_time_limit_saves_on_the_signal_sent_ahead_of_it(slurm, small_data, tmp_path):
    """--time=3 with --signal=USR1@60: SLURM signals the ranks when 60-120 s remain (`man sbatch`: up
    to 60 s early), after training has started; they stop after the step and save, and the job ends
    with 75 before the limit kills it. --rank-logs names a directory that does not exist yet."""
    config = ds_config(tmp_path / "ds.json", 2, micro=4, accum=2)
    endless = ["--max-length", "64", "--epochs", "1000", "--eval-every", "100000", "--save-every", "100000"]
    logs = tmp_path / "logs" / "ranks"  # created by launch.sh: srun would not
    options = ["--ds-config", str(config), "--master-port", str(free_port()), "--rank-logs", str(logs)]
    options += [*run_options(small_data, tmp_path), *endless]
    script = job_script(tmp_path, f"./launch.sh --launcher slurm {' '.join(options)}\n")
    result = sbatch(slurm, "--wait", "--time=3", "--signal=USR1@60", "-o", str(tmp_path / "job.out"), str(script))
    output = (tmp_path / "job.out").read_text() + "".join(log.read_text() for log in sorted(logs.glob("rank-*.log")))
    assert result.returncode == 75, output[-4000:]
    assert sorted(log.name for log in logs.iterdir()) == ["rank-0.log", "rank-1.log"]
    assert "SIGUSR1: stopping after this optimizer step" in output, output[-4000:]
    (step,) = re.findall(r"stopped on request after optimizer step (\d+)", output)  # after a progress bar's \r
    verify_manifest(tmp_path / "run" / "checkpoints" / f"step-{step}")  # complete: a resume would take it


@pytest.mark.cluster
def test_a_batch_config_that_does_not_fit_the_allocation_is_refused_before_training(slurm, small_data, tmp_path):
    config = ds_config(tmp_path / "ds.json", 2, micro=4, accum=2, train_batch_size=12)  # 12 != 4 x 2 x 2 ranks
    script = job_script(tmp_path, f"./launch.sh --launcher slurm {' '.join(run_args(tmp_path, small_data, config))}\n")
    result = sbatch(slurm, "--wait", "-o", str(tmp_path / "job.out"), str(script))
    output = (tmp_path / "job.out").read_text()
    assert result.returncode != 0
    assert "launch: error:" in output and "train_batch_size (12) must equal" in output, output[-3000:]
    assert "rank 0 of" not in output  # no rank ever started


@pytest.mark.cluster
def test_launcher_slurm_outside_an_allocation_or_with_a_hostfile_is_an_error():
    env = {key: value for key, value in __import__("os").environ.items() if not key.startswith("SLURM_")}
    outside = subprocess.run(launch_sh_command("--launcher", "slurm"), cwd=REPO, env=env, capture_output=True, text=True)
    assert outside.returncode == 2 and "--launcher slurm outside a SLURM allocation" in outside.stderr, outside.stderr
    both = subprocess.run(
        launch_sh_command("--launcher", "slurm", "--hostfile", "hostfiles/localhost"),
        cwd=REPO,
        env={**env, "SLURM_JOB_ID": "1"},
        capture_output=True,
        text=True,
    )
    assert both.returncode == 2 and "--hostfile with --launcher slurm" in both.stderr, both.stderr


def test_gpus_per_node_must_equal_tasks_per_node():
    check_slurm_gpus({"gpu1": 8}, {"gpu1": {"gpus": 8}}, "cuda")
    check_slurm_gpus({"gpu1": 2}, {"gpu1": {"gpus": 0}}, "cpu")  # CPU ranks: no GPUs to match
    with pytest.raises(ConfigError, match="gives gpu1 4 GPUs but 8 tasks: this pipeline runs one task per GPU"):
        check_slurm_gpus({"gpu1": 8}, {"gpu1": {"gpus": 4}}, "cuda")
