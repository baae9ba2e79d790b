"""launch.sh's checks that need no host: each bad input stops it before the deepspeed runner starts,
with the file and line named; the env file for remote ranks merges the user's own files, unchanged."""
import subprocess

from pipeline.check import read_hostfile
from pipeline.launcher import deepspeed_command, parse_args, rank_env, read_env_file

from conftest import REPO, cpu_env


def launch_sh(*args):
    return subprocess.run([str(REPO / "launch.sh"), *args], cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=120)


def test_missing_hostfile_is_an_error_not_a_fallback(tmp_path):
    result = launch_sh("--hostfile", str(tmp_path / "nodes"))
    assert result.returncode == 2
    assert f"launch: error: {tmp_path / 'nodes'}: hostfile not found" in result.stderr
    assert "runner.py" not in result.stdout + result.stderr


def test_malformed_hostfile_line_stops_the_launch(tmp_path):
    hostfile = tmp_path / "nodes"
    hostfile.write_text("# comment\nnode1 slots=8\nnode2 8\n")
    result = launch_sh("--hostfile", str(hostfile))
    assert result.returncode == 2
    assert f"launch: error: {hostfile}, line 3:" in result.stderr, result.stderr


def test_hostfiles_in_the_repository_parse():
    assert dict(read_hostfile(str(REPO / "hostfiles" / "localhost"))) == {"localhost": 2}
    assert dict(read_hostfile(str(REPO / "hostfiles" / "v100x8"))) == {"gpu-node-1": 8}
    assert dict(read_hostfile(str(REPO / "hostfiles" / "two-nodes"))) == {"gpu-node-1": 8, "gpu-node-2": 8}
    assert read_env_file(REPO / "hostfiles" / "two-nodes.env")["GLOO_SOCKET_IFNAME"] == "eth0"


def test_malformed_env_file_line_stops_the_launch(tmp_path):
    hostfile = tmp_path / "nodes"
    hostfile.write_text("node1 slots=1\nnode2 slots=1\n")
    (tmp_path / "nodes.env").write_text("# NCCL settings\nNCCL_DEBUG=INFO\nNCCL_SOCKET_IFNAME eth0\n")
    result = launch_sh("--hostfile", str(hostfile))
    assert result.returncode == 2
    assert f"launch: error: {tmp_path / 'nodes.env'}, line 3: expected KEY=VALUE" in result.stderr, result.stderr
    assert "runner.py" not in result.stdout + result.stderr


def test_openmpi_rejects_include_before_launching(tmp_path):
    hostfile = tmp_path / "nodes"
    hostfile.write_text("node1 slots=1\nnode2 slots=1\n")
    result = launch_sh("--hostfile", str(hostfile), "--launcher", "openmpi", "--include", "node1")
    assert result.returncode == 2
    assert "--launcher openmpi does not support --include/--exclude" in result.stderr


def test_include_of_an_unknown_host_is_an_error(tmp_path):
    hostfile = tmp_path / "nodes"
    hostfile.write_text("node1 slots=1\nnode2 slots=1\n")
    result = launch_sh("--hostfile", str(hostfile), "--include", "node3")
    assert result.returncode == 2
    assert f"launch: error: {hostfile}: --include node3: Hostname 'node3' not found" in result.stderr, result.stderr


def test_rank_env_merges_the_users_deepspeed_env_and_the_cluster_env_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    own = "MY_SETTING=1\nNCCL_DEBUG=WARN\n"
    (tmp_path / ".deepspeed_env").write_text(own)
    (tmp_path / "nodes.env").write_text("# cluster\n\nNCCL_DEBUG = INFO\nGLOO_SOCKET_IFNAME=lo\n")
    args, _ = parse_args(["--hostfile", "nodes", "--launcher", "openmpi", "--master-addr", "node1", "--master-port", "1234"])
    env = rank_env(args, tmp_path / "nodes")
    assert env["DS_ACCELERATOR"] == "cpu" and env["OMP_NUM_THREADS"] == "1"  # no GPU on the test machines
    assert (env["MASTER_ADDR"], env["MASTER_PORT"]) == ("node1", "1234")  # OpenMPI ranks get the rendezvous this way
    assert (env["MY_SETTING"], env["NCCL_DEBUG"], env["GLOO_SOCKET_IFNAME"]) == ("1", "INFO", "lo")  # cluster file wins
    assert (tmp_path / ".deepspeed_env").read_text() == own


def test_deepspeed_command_per_launcher():
    hosts = {"node1": 1, "node2": 1}
    args, train_args = parse_args(["--hostfile", "nodes", "--rank-logs", "logs", "--master-addr", "node1", "--master-port", "29500",
                                   "--max-steps", "4"])
    assert train_args == ["--max-steps", "4"]
    cmd = deepspeed_command(args, hosts, train_args, ssh_checked=True)
    assert cmd[:8] == ["deepspeed", "--hostfile", "nodes", "--master_addr", "node1", "--master_port", "29500", "--no_ssh_check"]
    assert "--enable_each_rank_log" in cmd and "--launcher" not in cmd
    assert cmd[-7:] == ["--module", "pipeline", "train", "--ds-config", "ds_configs/small_zero2.json", "--max-steps", "4"]
    args.launcher, args.launcher_args = "openmpi", "--allow-run-as-root"
    cmd = deepspeed_command(args, hosts, train_args, ssh_checked=True)
    assert cmd[cmd.index("--launcher") + 1] == "openmpi" and "--enable_each_rank_log" not in cmd
    assert cmd[cmd.index("--launcher_args") + 1] == "--allow-run-as-root --output-filename logs"  # mpirun's per-rank logs
