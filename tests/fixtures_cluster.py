"""Cluster fixtures: a 2-node ssh cluster and a one-node SLURM cluster, both on this machine."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
from helpers import cpu_env, free_port, require

NODES = {"127.0.1.1": "node1", "127.0.1.2": "node2"}  # loopback address -> hostname


DEAD_NODE = "127.0.1.3"  # in the ssh config, but no sshd listens there


SSH_CLIENT_CONFIG = Path("/etc/ssh/ssh_config.d/zero-pipeline-test-cluster.conf")


CLUSTER_LOCK = Path("/tmp/zero-pipeline-test-cluster.lock")


class Cluster:
    """Hostfiles for the running nodes (plus the dead one), each with an env file beside it."""

    def __init__(self, root: Path):
        self.root = root

    def hostfile(self, name: str, hosts) -> Path:
        path = self.root / name
        path.write_text("".join(f"{host} slots=1\n" for host in hosts), encoding="utf-8")
        # Gloo would look up each node's hostname (unknown to DNS here); keep it on loopback.
        path.with_name(name + ".env").write_text("GLOO_SOCKET_IFNAME=lo\n", encoding="utf-8")
        return path


def _start_sshd(root: Path, address: str, hostname: str, port: int) -> subprocess.Popen:
    """One node: an sshd on `address` only, in its own UTS namespace, so its sessions see `hostname`,
    and its own mount namespace, where ROOT/private-HOSTNAME is a tmpfs only this node sees (a
    directory that is not on a shared file system)."""
    config = root / f"sshd-{hostname}.conf"
    config.write_text(
        f"ListenAddress {address}\nPort {port}\nHostKey {root}/host_key\n"
        f"AuthorizedKeysFile {root}/authorized_keys\nPermitRootLogin prohibit-password\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n"
        f"StrictModes no\nPidFile {root}/sshd-{hostname}.pid\n"
    )  # StrictModes: tmp parents are world-writable
    sshd = shutil.which("sshd", path=os.environ.get("PATH", "") + ":/usr/sbin")
    with open(root / f"sshd-{hostname}.log", "w") as log:
        private = root / f"private-{hostname}"
        private.mkdir()
        script = 'hostname "$0" && mount -t tmpfs tmpfs "$3" && exec "$1" -D -e -f "$2"'
        return subprocess.Popen(
            ["unshare", "--uts", "--mount", "sh", "-c", script, hostname, sshd, str(config), str(private)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def _wait_listening(proc: subprocess.Popen, address: str, port: int, log: Path) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"sshd on {address} exited: {log.read_text()}")
        try:
            socket.create_connection((address, port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    pytest.fail(f"sshd on {address}:{port} not listening after 15 s: {log.read_text()}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Two nodes, node1 on 127.0.1.1 and node2 on 127.0.1.2, reached with root key login.

    The ssh client config for those addresses is machine-wide (pdsh, mpirun and the runner call
    plain `ssh HOST`), so two test sessions on one machine take turns through a lock file."""
    require("sshd", "ssh", "pdsh", "mpirun", "unshare")
    import fcntl

    with open(CLUSTER_LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        root = tmp_path_factory.mktemp("cluster")
        for key in ("client_key", "host_key"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(root / key)], check=True)
        (root / "authorized_keys").write_text((root / "client_key.pub").read_text())
        port = free_port()
        SSH_CLIENT_CONFIG.write_text(
            "# Written by the zero-pipeline test cluster fixture (tests/fixtures_cluster.py) and removed after it.\n"
            f"Host {' '.join([*NODES, DEAD_NODE])}\n    Port {port}\n    User root\n    IdentityFile {root}/client_key\n"
            "    IdentitiesOnly yes\n    StrictHostKeyChecking no\n    UserKnownHostsFile /dev/null\n    LogLevel ERROR\n"
        )
        Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege-separation directory
        nodes = []
        try:
            for address, hostname in NODES.items():
                nodes.append(_start_sshd(root, address, hostname, port))
                _wait_listening(nodes[-1], address, port, root / f"sshd-{hostname}.log")
            yield Cluster(root)
        finally:
            for node in nodes:
                node.terminate()
                node.wait(timeout=10)
            SSH_CLIENT_CONFIG.unlink(missing_ok=True)


SLURM_CONF = """ClusterName=pipelinetest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
# A requeued job may start again after the credential lifetime (default 120 s), when the scheduler
# next looks (default every 30-60 s): keep tests short.
AuthInfo=cred_expire=10
SchedulerParameters=sched_interval=2,bf_interval=2
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobRequeue=1
ReturnToService=2
MpiDefault=none
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
"""


def _munge_works() -> bool:
    encoded = subprocess.run(["munge", "-n"], capture_output=True)
    return encoded.returncode == 0 and subprocess.run(["unmunge"], input=encoded.stdout, capture_output=True).returncode == 0


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """A real one-node SLURM cluster: munged, slurmctld and slurmd (Debian's slurm-wlm), this machine
    as node, in a scratch directory. Yields the environment for SLURM's client commands (SLURM_CONF).

    One node with several tasks, not two nodes: two slurmd on one machine need distinct hostnames,
    which slurmctld resolves; the ssh test cluster covers what crosses nodes."""
    require(
        "munged",
        "munge",
        "slurmctld",
        "slurmd",
        "sbatch",
        "srun",
        "scontrol",
        "squeue",
        "scancel",
        install="apt-get install slurm-wlm munge",
        why_root="the SLURM test cluster needs root (SlurmUser=root, munged)",
    )
    root = tmp_path_factory.mktemp("slurm")
    (root / "state").mkdir(), (root / "spool").mkdir()
    conf = root / "slurm.conf"
    conf.write_text(
        SLURM_CONF.format(host=socket.gethostname(), ctld_port=free_port(), d_port=free_port(), root=root, cpus=os.cpu_count())
    )
    env = {**cpu_env(), "SLURM_CONF": str(conf)}
    munged = None
    if not _munge_works():  # start munged as its own user, as the package's service would
        Path("/run/munge").mkdir(exist_ok=True)
        shutil.chown("/run/munge", "munge", "munge")
        munged = subprocess.run(
            ["runuser", "-u", "munge", "--", shutil.which("munged", path="/usr/sbin:/sbin")], capture_output=True, text=True
        )
        assert munged.returncode == 0 and _munge_works(), f"munged did not start: {munged.stderr}"
    try:
        for daemon in (["slurmctld", "-c", "-f", str(conf)], ["slurmd", "-f", str(conf)]):
            started = subprocess.run(daemon, env=env, capture_output=True, text=True)
            assert started.returncode == 0, f"{daemon[0]} did not start: {started.stderr}"
        deadline = time.monotonic() + 30
        while subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True).stdout.strip() != "idle":
            assert time.monotonic() < deadline, (root / "slurmctld.log").read_text()[-3000:]
            time.sleep(0.5)
        yield env
    finally:
        subprocess.run(["scontrol", "shutdown"], env=env, capture_output=True)
        if munged is not None:
            subprocess.run(["pkill", "-u", "munge", "munged"], capture_output=True)
