"""Training over the 2-node test cluster (real sshd per node, pdsh, mpirun): each node runs its rank,
the loss curve equals a single-node 2-rank run, and a killed remote rank ends the job."""

import csv
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from fixtures_cluster import NODES
from helpers import REPO, cpu_env, ds_config, free_port, launch_sh_command, losses, read_jsonl, run_options, train

from pipeline.core.stop import PAUSE_AT

pytestmark = pytest.mark.cluster  # every test here launches ranks or trains

SHORT = ["--max-length", "64", "--eval-every", "0", "--seed", "7"]
OPENMPI_ARGS = "--allow-run-as-root --mca btl_tcp_if_include lo --mca oob_tcp_if_include lo"  # root here; loopback only


def rank_log(logs, rank):
    """A rank's log, as deepspeed's launcher (pdsh) or mpirun (--output-filename) lays them out."""
    (path,) = [*logs.glob(f"*_rank{rank}.log"), *logs.glob(f"*/rank.{rank}/stdout")]
    return path.read_text(encoding="utf-8")


def launch_args(cluster, tmp_path, data, config, launcher, extra):
    args = [
        "--hostfile",
        str(cluster.hostfile("nodes", NODES)),
        "--ds-config",
        str(config),
        "--master-port",
        str(free_port()),
        "--rank-logs",
        str(tmp_path / "logs"),
        "--launcher",
        launcher,
        *run_options(data, tmp_path),
        *SHORT,
        *extra,
    ]
    return launch_sh_command(*args, *(["--launcher-args", OPENMPI_ARGS] if launcher == "openmpi" else []))


@pytest.fixture(scope="module")
def single_node(tmp_path_factory, small_data):
    """The reference: 2 ranks on one node, same config and seed."""
    tmp = tmp_path_factory.mktemp("single")
    config = ds_config(tmp / "ds.json", 2, micro=4, accum=2)
    return config, losses(train(tmp, "run", small_data, config, extra=[*SHORT, "--max-steps", "2"]))


def test_two_nodes_train_like_one_node_over_mpirun(cluster, single_node, small_data, tmp_path):
    config, reference = single_node
    result = subprocess.run(
        launch_args(cluster, tmp_path, small_data, config, "openmpi", ["--max-steps", "2"]),
        cwd=REPO,
        env=cpu_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    assert_ranks_on_their_nodes(tmp_path / "logs")
    assert len(reference) == 2 and losses(tmp_path / "run") == reference  # the second step follows the first's all-reduce


TEXT, LABEL, RUN = "te`touch PWNED`xt", "dx;touch PWNED", "x$(touch PWNED)"  # a shell would run these
SECRETS = {"MLFLOW_TRACKING_PASSWORD": "p@ss$word1", "WANDB_API_KEY": "wandb-key-0042"}


def hostile_copy(data: dict, directory: Path) -> dict:
    """The data as CSV files with shell-active column names, in a directory a shell would split."""
    directory.mkdir()
    copies = {}
    for split, path in data.items():
        copies[split] = directory / f"{split}(1).csv"
        with open(copies[split], "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow([TEXT, LABEL])
            writer.writerows([r["text"], r["label"]] for r in read_jsonl(path))
    return copies


def test_two_nodes_over_pdsh_train_like_one_node_whatever_the_strings_with_no_secret_on_a_command_line(
    cluster, single_node, small_data, tmp_path
):
    """Over pdsh (DeepSpeed's runner joins each node's command into one shell string): data in
    `notes (2024); ward 3/`, shell-active column names and run name, the env file's secrets (one with `$`)
    and one in this environment. Rank 0 pauses at data preparation (the test hook's path has a `$`
    too, so its pid file appears only if the value arrived intact): there `ps` shows no secret; at the
    end the run equals one node's, nothing executed, and no secret is in the console, the rank logs or
    any file of the run."""
    config, reference = single_node
    data = hostile_copy(small_data, tmp_path / "notes (2024); ward 3")
    hostfile = cluster.hostfile("nodes", NODES)
    pause = tmp_path / "pause$HOME.pid"
    env_file = hostfile.with_name("nodes.env")
    env_file.write_text(env_file.read_text() + "".join(f"{k}={v}\n" for k, v in SECRETS.items()) + f"{PAUSE_AT}=data:{pause}\n")
    options = ["--train-file", str(data["train"]), "--dev-file", str(data["dev"]), "--text-column", TEXT, "--label-column", LABEL]
    cmd = launch_sh_command(
        "--hostfile", str(hostfile), "--ds-config", str(config), "--master-port", str(free_port()), "--rank-logs",
        str(tmp_path / "logs"), *options, "--output-dir", str(tmp_path), "--run-name", RUN, "--cache-dir",
        str(tmp_path / "cache"), *SHORT, "--max-steps", "2",
    )  # fmt: skip
    env = {**cpu_env(), "MLFLOW_TRACKING_TOKEN": "token-from-the-login-shell"}
    with open(tmp_path / "console.txt", "w") as console:
        job = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=console, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 180
            while not pause.exists():
                assert job.poll() is None and time.monotonic() < deadline, (tmp_path / "console.txt").read_text()[-4000:]
                time.sleep(0.2)
            processes = subprocess.run(["ps", "-eww", "-o", "args"], capture_output=True, text=True, check=True).stdout
            pause.unlink()
            code = job.wait(timeout=240)
        finally:
            if job.poll() is None:
                job.kill()
    output = (tmp_path / "console.txt").read_text()
    assert code == 0, output[-6000:]
    ranks = [
        line for line in processes.splitlines() if line.startswith("pdsh ") or "--launch-file" in line
    ]  # the ranks, not the launcher
    assert any(line.startswith("pdsh ") for line in ranks) and not any(RUN in line or TEXT in line for line in ranks), ranks
    assert_ranks_on_their_nodes(tmp_path / "logs")
    assert losses(tmp_path / RUN) == reference
    planted = [*SECRETS.values(), "token-from-the-login-shell"]
    for name, text in [("ps", processes), ("console", output)] + [
        (str(path), path.read_text(errors="replace"))
        for path in [*(tmp_path / RUN).rglob("*"), *(tmp_path / "logs").rglob("*")]
        if path.is_file() and path.suffix not in (".safetensors", ".pt", ".arrow")
    ]:
        assert not any(secret in text for secret in planted), name
    for place in (tmp_path, REPO, Path.home(), Path("/")):
        assert not (place / "PWNED").exists(), place
    assert not list(tmp_path.glob(".launch-*"))  # the launch file went with the launch


def assert_ranks_on_their_nodes(logs: Path) -> None:
    for rank, hostname in enumerate(NODES.values()):
        log = rank_log(logs, rank)
        assert f"rank {rank} of 2: host {hostname}," in log, log[-3000:]
        assert "Unable to resolve hostname" not in log  # gloo used GLOO_SOCKET_IFNAME from the env file


def test_killed_remote_rank_ends_the_job_within_the_timeout(cluster, small_data, tmp_path):
    timeout_s = 30
    config = ds_config(tmp_path / "ds.json", 2, micro=4, accum=2)
    cmd = launch_args(
        cluster, tmp_path, small_data, config, "pdsh", ["--epochs", "100", "--dist-timeout-minutes", str(timeout_s / 60)]
    )
    with open(tmp_path / "console.txt", "w") as console:
        job = subprocess.Popen(cmd, cwd=REPO, env=cpu_env(), stdout=console, stderr=subprocess.STDOUT)
        try:
            metrics, deadline = tmp_path / "run" / "metrics.jsonl", time.monotonic() + 180
            while not (metrics.is_file() and metrics.read_text().count('"loss"') >= 2):  # training is under way
                assert job.poll() is None and time.monotonic() < deadline, (tmp_path / "console.txt").read_text()[-4000:]
                time.sleep(0.5)
            remote = rank_log(tmp_path / "logs", 1)
            pid = int(remote.split("rank 1 of 2: host node2, pid ")[1].split(",")[0])
            os.kill(pid, signal.SIGKILL)
            killed = time.monotonic()
            code = job.wait(timeout=timeout_s + 60)
            elapsed = time.monotonic() - killed
        finally:
            if job.poll() is None:
                job.terminate()
                job.wait(timeout=30)
    assert code != 0
    assert elapsed < timeout_s + 15, f"job ended {elapsed:.0f} s after the kill"
    print(f"job exited {code} {elapsed:.1f} s after its remote rank was killed")
