"""`python -m pipeline doctor` and launch.sh's preflight against the 2-node test cluster (real sshd)."""
import socket
import subprocess
import sys
import time

from conftest import DEAD_NODE, NODES, REPO, cpu_env, free_port


def doctor(hostfile, *extra):
    return subprocess.run([sys.executable, "-m", "pipeline", "doctor", "--hostfile", str(hostfile), *extra],
                          cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=120)


def test_doctor_passes_two_live_nodes_with_one_row_each(cluster):
    result = doctor(cluster.hostfile("live", NODES), "--master-port", str(free_port()))
    assert result.returncode == 0, result.stdout + result.stderr
    rows = result.stdout.splitlines()
    assert rows[0].split()[:4] == ["host", "slots", "hostname", "python"]
    for address, hostname in NODES.items():
        (row,) = [r for r in rows if r.startswith(address)]
        assert row.split()[2] == hostname and row.endswith("ok"), row


def test_doctor_names_the_dead_node(cluster):
    result = doctor(cluster.hostfile("live-and-dead", ["127.0.1.1", DEAD_NODE]))
    assert result.returncode != 0
    assert [r.split()[-1] for r in result.stdout.splitlines()[1:]] == ["ok", "FAILED"], result.stdout
    assert f"doctor: {DEAD_NODE}: ssh failed non-interactively" in result.stderr
    assert "Connection refused" in result.stderr
    assert "127.0.1.1:" not in result.stderr  # the live node has no problem


def test_doctor_finds_the_master_port_taken_on_the_first_node(cluster):
    with socket.socket() as taken:
        taken.bind(("127.0.1.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = doctor(cluster.hostfile("live", NODES), "--master-port", str(port))
    assert result.returncode != 0
    assert f"doctor: 127.0.1.1: master port {port} is in use" in result.stderr, result.stderr


def test_launch_on_a_dead_node_fails_fast_with_the_doctors_message(cluster, small_data, tmp_path):
    started = time.monotonic()
    result = subprocess.run([str(REPO / "launch.sh"), "--hostfile", str(cluster.hostfile("live-and-dead", ["127.0.1.1", DEAD_NODE])),
                             "--master-port", str(free_port()), "--train-file", str(small_data["train"]),
                             "--dev-file", str(small_data["dev"]), "--output-dir", str(tmp_path)],
                            cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - started
    assert result.returncode != 0
    assert f"doctor: {DEAD_NODE}: ssh failed non-interactively" in result.stderr, result.stdout + result.stderr
    assert "runner.py" not in result.stdout + result.stderr  # the deepspeed runner never started
    assert elapsed < 30, elapsed
