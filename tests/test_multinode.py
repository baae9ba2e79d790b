"""Training over the 2-node test cluster (real sshd per node, pdsh, mpirun): each node runs its rank,
the loss curve equals a single-node 2-rank run, and a killed remote rank ends the job."""

import os
import signal
import subprocess
import time

import pytest
from fixtures_cluster import NODES
from helpers import REPO, cpu_env, ds_config, free_port, launch_sh_command, losses, run_options, train

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


@pytest.mark.parametrize("launcher", ["pdsh", "openmpi"])
def test_two_nodes_train_like_one_node(cluster, single_node, small_data, launcher, tmp_path):
    config, reference = single_node
    result = subprocess.run(
        launch_args(cluster, tmp_path, small_data, config, launcher, ["--max-steps", "2"]),
        cwd=REPO,
        env=cpu_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    assert "GLOO_SOCKET_IFNAME=lo" in output  # the runner exported the cluster's env file to the remote ranks
    for rank, hostname in enumerate(NODES.values()):
        log = rank_log(tmp_path / "logs", rank)
        assert f"rank {rank} of 2: host {hostname}," in log, log[-3000:]
        assert "Unable to resolve hostname" not in log  # gloo used GLOO_SOCKET_IFNAME from the env file
    assert len(reference) == 2 and losses(tmp_path / "run") == reference  # the second step follows the first's all-reduce


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
