"""Shared fixtures: small data cut from the bundled sample, DeepSpeed configs, and a launcher
that starts real ranks with the real `deepspeed` runner on DeepSpeed's CPU accelerator."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.tasks.single_label import SINGLE_LABEL

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "pipeline" / "sample_data"


def cpu_env() -> dict:
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    env.pop("RANK", None), env.pop("WORLD_SIZE", None)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def losses(run_dir: Path) -> list[float]:
    """The per-optimizer-step training losses a run logged."""
    return [row["loss"] for row in read_jsonl(run_dir / "metrics.jsonl") if "loss" in row]


@pytest.fixture(scope="session")
def small_data(tmp_path_factory) -> dict:
    """256 training records and 37 dev records (37 does not divide by 2 ranks)."""
    root = tmp_path_factory.mktemp("data")
    return {
        "train": write_jsonl(root / "train.jsonl", read_jsonl(SAMPLE / "train.jsonl")[:256]),
        "dev": write_jsonl(root / "dev.jsonl", read_jsonl(SAMPLE / "dev.jsonl")[:37]),
    }


@pytest.fixture(scope="session")
def multilabel_run(tmp_path_factory) -> Path:
    """A 2-rank multi-label run with balanced class weights on 128 records of the bundled multilabel set,
    37 dev records (odd: one rank gets a filler) and 21 test records; returns its run directory."""
    root = tmp_path_factory.mktemp("multilabel")
    data = {
        "train": write_jsonl(root / "train.jsonl", read_jsonl(SAMPLE / "multilabel_train.jsonl")[:128]),
        "dev": write_jsonl(root / "dev.jsonl", read_jsonl(SAMPLE / "multilabel_dev.jsonl")[:37]),
    }
    test = write_jsonl(root / "test.jsonl", read_jsonl(SAMPLE / "multilabel_test.jsonl")[:21])
    options = ["--task", "multi_label", "--class-weights", "balanced", "--test-file", str(test), "--max-length", "64"]
    options += ["--epochs", "2", "--eval-every", "4", "--log-every", "4", "--eval-batch-size", "8", "--tensorboard", "0"]
    return train(root, "run", data, ds_config(root / "ds.json", 2, micro=4, accum=2), extra=options)


def ds_config(path: Path, stage: int, micro: int, accum: int, lr: float = 1e-3, **extra) -> Path:
    """A small fp32 config: AdamW with a constant learning rate, ZeRO `stage`."""
    cfg = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": 1.0,
        "optimizer": {"type": "AdamW", "params": {"lr": lr, "weight_decay": 0.01}},
        "zero_optimization": {"stage": stage},
        "steps_per_print": 1000000,
        **extra,
    }
    path.write_text(json.dumps(cfg), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def initial_model(tmp_path_factory, small_data) -> Path:
    """A tiny BERT with saved random weights, a tokenizer and no dropout: every run that starts
    from it starts from the same weights, whatever the world size or ZeRO stage."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from pipeline.data.cache import read_split
    from pipeline.data.tokenizer import build_tokenizer, load_tokenizer

    root = tmp_path_factory.mktemp("model")
    train = read_split(str(small_data["train"]), "text", "label", SINGLE_LABEL)
    tokenizer = load_tokenizer(str(build_tokenizer(train.texts, train.split.key, str(root / "cache"))), 128)
    config = AutoConfig.from_pretrained(
        REPO / "pipeline" / "models" / "tiny-bert",
        hidden_size=32,
        intermediate_size=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        vocab_size=len(tokenizer),
        num_labels=len(set(train.labels)),
    )
    import torch

    torch.manual_seed(0)
    model_dir = root / "tiny-init"
    AutoModelForSequenceClassification.from_config(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return model_dir


def launch(
    args: list[str], ranks: int = 2, timeout: int = 300, cwd: Path = REPO, env: dict | None = None
) -> subprocess.CompletedProcess:
    """`deepspeed --num_gpus RANKS --module pipeline ARGS` on CPU ranks (plus `env`); output captured."""
    port = free_port()
    cmd = ["deepspeed", "--num_gpus", str(ranks), "--master_port", str(port), "--module", "pipeline", *args]
    result = subprocess.run(cmd, cwd=cwd, env={**cpu_env(), **(env or {})}, capture_output=True, text=True, timeout=timeout)
    # DeepSpeed's CPU backend leaves a ~70 MB /dev/shm buffer per rank unless the pipeline unlinks it.
    leaked = list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    assert not leaked, f"shared-memory buffers left behind: {leaked}"
    return result


def plot(run_dir: Path, *options: str) -> subprocess.CompletedProcess:
    """`python -m pipeline plot RUN_DIR OPTIONS` in a plain process; output captured."""
    return subprocess.run(
        [sys.executable, "-m", "pipeline", "plot", str(run_dir), *options],
        cwd=REPO,
        env=cpu_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )


def run_options(data: dict, out: Path, name: str = "run") -> list[str]:
    """The data and output options of a test run: train and dev files, output directory, run name, cache."""
    return [
        "--train-file",
        str(data["train"]),
        "--dev-file",
        str(data["dev"]),
        "--output-dir",
        str(out),
        "--run-name",
        name,
        "--cache-dir",
        str(out / "cache"),
    ]


def train(tmp_path: Path, name: str, data: dict, config: Path, ranks: int = 2, extra: list[str] = ()) -> Path:
    """Run training to completion and return its run directory (fails the test on a non-zero exit).

    The launcher's console output is kept next to it, in NAME.console.txt."""
    args = [
        "train",
        "--ds-config",
        str(config),
        *run_options(data, tmp_path, name),
        *extra,
    ]
    result = launch(args, ranks=ranks)
    assert result.returncode == 0, f"training failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    (tmp_path / f"{name}.console.txt").write_text(result.stdout + result.stderr, encoding="utf-8")
    return tmp_path / name


# Runs that are stopped and resumed (test_stop, test_slurm) and the uninterrupted run they must equal.
STOP_SETTINGS = [
    "--max-length",
    "64",
    "--max-steps",
    "12",
    "--epochs",
    "3",
    "--eval-every",
    "4",
    "--save-every",
    "4",
    "--log-every",
    "1",
    "--seed",
    "5",
]


@pytest.fixture(scope="session")
def uninterrupted(tmp_path_factory, small_data) -> tuple[Path, Path]:
    """(DeepSpeed config, run directory) of STOP_SETTINGS trained without interruption on 2 CPU ranks."""
    tmp = tmp_path_factory.mktemp("uninterrupted")
    config = ds_config(tmp / "ds.json", 2, micro=4, accum=2)
    return config, train(tmp, "run", small_data, config, extra=STOP_SETTINGS)


# Long records read in overlapping windows (reading.py): a short 2-rank run, pooled with max.
CHUNK_SETTINGS = ["--max-length", "64", "--long-records", "chunks", "--stride", "16", "--pool", "max"]
# Notes whose label rests on a finding repeated through boilerplate (every few sentences, so a
# few steps teach it and the predictions differ between records).
FINDINGS = {"肺炎": "胸部CT示右下肺斑片影。", "脑卒中": "头颅CT示左侧基底节区低密度灶。", "其他": ""}
BOILERPLATE = "患者一般情况可，饮食睡眠正常，无特殊不适。"


def long_notes(count: int, seed: int) -> list[dict]:
    """Records of 3 to 14 windows of 64 tokens, of three labels in turn, the finding every 3-5 sentences."""
    import random

    rng = random.Random(seed)
    rows = []
    for i in range(count):
        label = list(FINDINGS)[i % 3]
        parts = []
        for _ in range(rng.randint(2, 6)):
            parts += [BOILERPLATE] * rng.randint(3, 5) + [FINDINGS[label]]
        rows.append({"text": "".join(parts), "label": label})
    return rows


@pytest.fixture(scope="session")
def chunked_run(tmp_path_factory) -> Path:
    """Run directory of 40 steps on 2 CPU ranks with CHUNK_SETTINGS: 96 training notes and 37 dev
    notes (37 does not divide by 2 ranks; the notes differ in window count)."""
    tmp = tmp_path_factory.mktemp("chunked")
    data = {
        "train": write_jsonl(tmp / "train.jsonl", long_notes(96, 1)),
        "dev": write_jsonl(tmp / "dev.jsonl", long_notes(37, 2)),
    }
    config = ds_config(tmp / "ds.json", 2, micro=4, accum=1, lr=2e-3)
    extra = [*CHUNK_SETTINGS, "--max-steps", "40", "--epochs", "10", "--eval-every", "0", "--tensorboard", "0"]
    return train(tmp, "run", data, config, extra=extra)


def export_window_logits(run_dir: Path):
    """(the run's dev windows as data.TokenizedSplit, their logits from the export in this one process,
    label names): the plain single-process evaluation a distributed one must equal."""
    import numpy as np
    import torch

    from pipeline.checkpoint.export import load_export
    from pipeline.data.cache import TokenizedSplit

    tokenizer, model = load_export(run_dir / "export")
    (cache,) = (run_dir.parent / "cache").glob("tokenized-dev-*")
    names = [model.config.id2label[i] for i in range(model.config.num_labels)]
    split = TokenizedSplit(cache, tokenizer.pad_token_id, names, SINGLE_LABEL, "max")
    logits = []
    with torch.no_grad():
        for start in range(0, len(split), 16):
            batch = split.batch(range(start, min(start + 16, len(split))))
            logits.append(model(**{k: v for k, v in batch.items() if k != "labels"}).logits.numpy())
    return split, np.concatenate(logits), names


# A run that early stopping ends (test_train) and its resumed copy (test_resume): 16 steps per epoch,
# a checkpointed dev evaluation every 2 steps, stopped after 3 of them without a new best macro-F1.
EARLY_STOP_SETTINGS = (
    "--max-length 64 --eval-batch-size 8 --epochs 6 --eval-every 2 --save-every 2 --keep-checkpoints 100 "
    "--best-metric macro_f1 --early-stopping-patience 3 --log-every 1"
).split()


@pytest.fixture(scope="session")
def early_stopped(tmp_path_factory, small_data):
    """early_stopped(stage): (DeepSpeed config, run directory) of EARLY_STOP_SETTINGS on 2 CPU ranks."""
    runs = {}

    def get(stage: int) -> tuple[Path, Path]:
        if stage not in runs:
            tmp = tmp_path_factory.mktemp(f"early-stopped-zero{stage}")
            config = ds_config(tmp / "ds.json", stage, micro=4, accum=2, lr=3e-3)
            runs[stage] = config, train(tmp, "run", small_data, config, extra=EARLY_STOP_SETTINGS)
        return runs[stage]

    return get


def early_stop_step(run_dir: Path, every: int, patience: int) -> tuple[int | None, int]:
    """(step where early stopping should end the run, best step), counted by hand from its dev
    evaluations at the checkpointed steps; (None, best) if it should not stop."""
    best, best_step, since = None, 0, 0
    for step in range(every, 10**6, every):
        path = run_dir / "eval" / f"dev-step-{step}.json"
        if not path.is_file():
            return None, best_step
        value = json.loads(path.read_text(encoding="utf-8"))["macro_f1"]
        if best is None or value > best:
            best, best_step, since = value, step, 0
        else:
            since += 1
        if since == patience:
            return step, best_step


# ----------------------------------------------------------------------------------------------
# A 2-node cluster on this machine, for the multi-node tests
# ----------------------------------------------------------------------------------------------

NODES = {"127.0.1.1": "node1", "127.0.1.2": "node2"}  # loopback address -> hostname
DEAD_NODE = "127.0.1.3"  # in the ssh config, but no sshd listens there
SSH_CLIENT_CONFIG = Path("/etc/ssh/ssh_config.d/zero-pipeline-test-cluster.conf")
CLUSTER_LOCK = Path("/tmp/zero-pipeline-test-cluster.lock")


def require(
    *programs: str,
    install: str = "apt-get install openssh-server pdsh openmpi-bin libopenmpi-dev",
    why_root: str = "the test cluster needs root (sshd in UTS namespaces, /etc/ssh/ssh_config.d)",
) -> None:
    """Skip a test whose prerequisite is missing, saying which; under CI (CI=true) fail instead."""
    path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"  # sshd lives in sbin
    missing = [p for p in programs if not shutil.which(p, path=path)]
    message = ""
    if missing:
        message = f"missing {', '.join(missing)}: {install}"
    elif os.geteuid() != 0:
        message = why_root
    if message:
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)


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
            "# Written by the zero-pipeline test cluster fixture (tests/conftest.py) and removed after it.\n"
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


# ----------------------------------------------------------------------------------------------
# A one-node SLURM cluster on this machine, for the SLURM tests
# ----------------------------------------------------------------------------------------------

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
