"""launch.sh's checks that need no host: each bad input stops it before the deepspeed runner starts,
with the file and line named; the env file for remote ranks merges the user's own files, unchanged."""
import subprocess

import pytest

from pipeline.check import read_hostfile
from pipeline.config import ConfigError
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


def pdsh_rank_value(key: str, value: str) -> str:
    """What a rank started by pdsh sees: DeepSpeed's PDSHRunner builds `export KEY=VALUE;` for a shell."""
    import argparse

    from deepspeed.launcher.multinode_runner import PDSHRunner

    runner = PDSHRunner(argparse.Namespace(user_args=[], user_script="x", launcher_args=""), "")
    runner.add_export(key, value)
    script = f"export {key}={runner.exports[key]}; printf %s \"${key}\""
    return subprocess.run(["sh", "-c", script], capture_output=True, text=True, check=True).stdout


@pytest.mark.parametrize("line, value", [
    ('FOO="a b"', "a b"), ("FOO='a b'", "a b"), ("FOO=a b", "a b"), ("FOO=^docker0,lo", "^docker0,lo"),
    ("FOO=x;y&z|w", "x;y&z|w"), ("FOO=it's", "it's"), ('FOO=""', ""), ("FOO=eth0", "eth0"),
])
def test_env_values_are_the_same_for_local_and_pdsh_ranks(tmp_path, line, value):
    (tmp_path / "nodes.env").write_text(line + "\n")
    local = read_env_file(tmp_path / "nodes.env")["FOO"]
    assert local == value == pdsh_rank_value("FOO", local)


@pytest.mark.parametrize("line, what", [
    ("FOO=$(id)", "contains '$'"), ('FOO="$HOME/x"', "contains '$'"), ("FOO=`id`", "contains '`'"),
    ('FOO=a"b', """contains '"'"""), ("FOO=a\\b", r"contains '\\'"), ('FOO=" a"', "starts or ends with a space"),
])
def test_env_values_the_runner_would_mangle_are_refused_with_file_and_line(tmp_path, line, what):
    (tmp_path / "nodes.env").write_text("# cluster\nOK=1\n" + line + "\n")
    with pytest.raises(ConfigError) as e:
        read_env_file(tmp_path / "nodes.env")
    assert f"{tmp_path / 'nodes.env'}, line 3: FOO" in str(e.value) and what in str(e.value)


def test_openmpi_refuses_values_deepspeed_would_pass_in_literal_quotes(tmp_path):
    (tmp_path / "nodes.env").write_text("NCCL_SOCKET_IFNAME=eth0\nFOO=a b\n")
    assert read_env_file(tmp_path / "nodes.env")["FOO"] == "a b"
    with pytest.raises(ConfigError, match="nodes.env, line 2: FOO='a b': with --launcher openmpi"):
        read_env_file(tmp_path / "nodes.env", "openmpi")


@pytest.mark.parametrize("host", ["-oProxyCommand=touch${IFS}/tmp/x", "node1;id", "node$(id)", "a`b`"])
def test_hostnames_that_pdsh_or_ssh_would_misread_are_refused(tmp_path, host):
    path = tmp_path / "nodes"
    path.write_text(f"node0 slots=1\n{host} slots=1\n")
    with pytest.raises(ConfigError, match=f"{path}, line 2: .* is not a host name"):
        read_hostfile(str(path))
    path.write_text("node0 slots=1\nnode-1.cluster_a slots=2\n10.0.0.7 slots=1\n")
    assert list(read_hostfile(str(path))) == ["node0", "node-1.cluster_a", "10.0.0.7"]


def test_master_addr_that_is_not_a_host_name_stops_the_launch(tmp_path):
    hostfile = tmp_path / "nodes"
    hostfile.write_text("node1 slots=1\nnode2 slots=1\n")
    result = launch_sh("--hostfile", str(hostfile), "--master-addr", "node1;id")
    assert result.returncode == 2
    assert "launch: error: --master-addr 'node1;id' is not a host name" in result.stderr, result.stderr
