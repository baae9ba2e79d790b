"""Test helpers: small data files, DeepSpeed configs, and the one way the tests start real ranks
(`launch`: the real `deepspeed` runner on DeepSpeed's CPU accelerator; `launch_sh`: ./launch.sh)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.core.base import free_port
from pipeline.tasks.single_label import SINGLE_LABEL

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "pipeline" / "sample_data"


def cpu_env() -> dict:
    """This environment for a launched process, on DeepSpeed's CPU accelerator, without the rank
    variables of the in-process tier's world of one (the `one_rank` fixture)."""
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def fake_nvidia_smi(bin_dir, gpus: int) -> str:
    """A PATH on which `nvidia-smi` answers the probe's query as a node with `gpus` V100s would."""
    bin_dir.mkdir()
    script = bin_dir / "nvidia-smi"
    script.write_text("#!/bin/sh\n" + "".join("echo '7.0, 535.104.05'\n" for _ in range(gpus)))
    script.chmod(0o755)
    return f"{bin_dir}:{os.environ['PATH']}"


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def losses(run_dir: Path) -> list[float]:
    """The per-optimizer-step training losses a run logged."""
    return [row["loss"] for row in read_jsonl(run_dir / "metrics.jsonl") if "split" not in row]


# Every Hugging Face optimizer flag at a value other than its default (test_ds_config, test_loop).
HF_FLAGS = dict(
    learning_rate=3e-4,
    weight_decay=0.05,
    adam_beta1=0.8,
    adam_beta2=0.95,
    adam_epsilon=1e-6,
    max_grad_norm=0.5,
    lr_scheduler_type="cosine",
    gradient_accumulation_steps=8,
    precision="bf16",
)


def steps_logged(run_dir: Path) -> int:
    """Training rows in metrics.jsonl so far (evaluation rows, with "split", carry a loss too); the
    file may be mid-write."""
    metrics = run_dir / "metrics.jsonl"
    return sum('"split"' not in line for line in metrics.read_text().splitlines()) if metrics.is_file() else 0


def ds_config(path: Path, stage: int, micro: int, accum: int, lr: float = 1e-3, **extra) -> Path:
    """A small fp32 config: AdamW with a constant learning rate (a warmup from lr to lr), ZeRO `stage`."""
    cfg = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": 1.0,
        "optimizer": {"type": "AdamW", "params": {"lr": lr, "weight_decay": 0.01}},
        "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": lr, "warmup_max_lr": lr}},
        "zero_optimization": {"stage": stage},
        "steps_per_print": 1000000,
        **extra,
    }
    path.write_text(json.dumps(cfg), encoding="utf-8")
    return path


def rank_processes(launcher_pid: int, rank: int) -> list:
    """The processes of local rank `rank` under a deepspeed launcher. A child that already exited (a
    zombie not yet reaped, like rank 0's finished baseline process) has no command line to read."""
    import psutil

    found = []
    for p in psutil.Process(launcher_pid).children(recursive=True):
        try:
            if f"--local_rank={rank}" in " ".join(p.cmdline()):
                found.append(p)
        except (psutil.ZombieProcess, psutil.NoSuchProcess):
            pass
    return found


def in_ci() -> bool:
    """CI=true, as GitHub Actions, GitLab and .ci/run set it (also 1 or yes, any case)."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


# The test now running (set by conftest.py), so that a launch can check the test is marked for it.
current_test = None
# Processes the tests launched, by kind: the count conftest.py reports at the end of the session.
LAUNCHES: dict[str, int] = {}


def note_launch(kind: str) -> None:
    """Count a launched process, and fail a test that launches one without a `ranks` or `cluster` mark
    (the in-process tier, `-m "not slow"`, starts no process)."""
    test = current_test
    if test is not None:
        if not any(test.get_closest_marker(mark) for mark in ("ranks", "cluster")):
            pytest.fail(f"{test.nodeid} launches {kind} but is not marked ranks or cluster", pytrace=False)
        test.user_properties.append(("launch", kind))
    LAUNCHES[kind] = LAUNCHES.get(kind, 0) + 1


# Launched runs leave out what no test reads unless it asks for it: the TF-IDF baseline (a third
# process on two cores) and the trackers (TensorBoard events, a confusion-matrix figure per
# evaluation). They come first, so a test's own --baseline or --report-to wins (argparse: the last).
CHEAP = ["--baseline", "none", "--report-to", "none"]


def cheap(args: list[str]) -> list[str]:
    """`args` with CHEAP after its leading words (the command: train, pretrain; or a run file)."""
    words = next((i for i, a in enumerate(args) if a.startswith("-")), len(args))
    return [*args[:words], *CHEAP, *args[words:]]


# DeepSpeed's runner as ./launch.sh starts it: the `deepspeed` command's own main, without the mlflow
# import of DeepSpeed's autotuner (1.3-1.6 s of each start). The plain `deepspeed` command starts the
# ranks of the tools' launches (pipeline.tools.common: smoke, gpu_check, comms, bench_data).
RUNNER = [sys.executable, "-m", "pipeline.launch.runner"]


def deepspeed_command(args: list[str], ranks: int = 2, port: int | None = None) -> list[str]:
    """`deepspeed --num_gpus RANKS --master_port PORT --module pipeline ARGS` (a free port, CHEAP
    defaults for train and pretrain): how every test starts ranks with the real runner (`launch`, or
    a Popen of its own where a test signals the job)."""
    note_launch("deepspeed")
    args = cheap(args) if args[:1] in (["train"], ["pretrain"]) else args
    return [*RUNNER, "--num_gpus", str(ranks), "--master_port", str(port or free_port()), "--module", "pipeline", *args]


def launch(
    args: list[str], ranks: int = 2, timeout: int = 300, cwd: Path = REPO, env: dict | None = None
) -> subprocess.CompletedProcess:
    """`deepspeed --num_gpus RANKS --module pipeline ARGS` on CPU ranks (plus `env`); output captured."""
    port = free_port()
    cmd = deepspeed_command(args, ranks, port)
    result = subprocess.run(cmd, cwd=cwd, env={**cpu_env(), **(env or {})}, capture_output=True, text=True, timeout=timeout)
    # DeepSpeed's CPU backend leaves a ~70 MB /dev/shm buffer per rank unless the pipeline unlinks it.
    leaked = list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    assert not leaked, f"shared-memory buffers left behind: {leaked}"
    return result


def plot(run_dir: Path, *options: str) -> subprocess.CompletedProcess:
    """`python -m pipeline plot RUN_DIR OPTIONS` in a plain process; output captured."""
    return pipeline_command("plot", str(run_dir), *options)


def output_options(out: Path, name: str = "run") -> list[str]:
    """The output options of a test run: output directory, run name, cache."""
    return ["--output-dir", str(out), "--run-name", name, "--cache-dir", str(out / "cache")]


def run_options(data: dict, out: Path, name: str = "run") -> list[str]:
    """The data and output options of a test run: train and dev files, output directory, run name, cache."""
    return ["--train-file", str(data["train"]), "--dev-file", str(data["dev"]), *output_options(out, name)]


def train_args(config: Path, data: dict, out: Path, name: str = "run", *extra: str) -> list[str]:
    """`train --ds-config CONFIG` with the data and output options of a test run, then `extra`."""
    return ["train", "--ds-config", str(config), *run_options(data, out, name), *extra]


def launch_sh_command(*args: str) -> list[str]:
    """`./launch.sh ARGS` with CHEAP defaults and a free --master-port unless ARGS give one: for
    `launch_sh`, or a Popen of its own where a test signals or waits on the job."""
    note_launch("launch.sh")
    args = cheap(list(args))
    if "--master-port" not in args:
        args = [*args, "--master-port", str(free_port())]
    return [str(REPO / "launch.sh"), *args]


def launch_sh(*args: str, cwd: Path = REPO, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """`./launch.sh ARGS` (CPU ranks' environment plus `env`); output captured."""
    command = launch_sh_command(*args)
    return subprocess.run(command, cwd=cwd, env={**cpu_env(), **(env or {})}, capture_output=True, text=True, timeout=timeout)


def pipeline_command(*args: str, timeout: int = 300, **kwargs) -> subprocess.CompletedProcess:
    """`python -m pipeline ARGS` in a plain process (predict, export, plot ...); output captured."""
    note_launch("python -m pipeline")
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args],
        cwd=REPO,
        env=cpu_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        **kwargs,
    )


def train(tmp_path: Path, name: str, data: dict, config: Path, ranks: int = 2, extra: list[str] = ()) -> Path:
    """Run training to completion and return its run directory (fails the test on a non-zero exit).

    The launcher's console output is kept next to it, in NAME.console.txt."""
    result = launch(train_args(config, data, tmp_path, name, *extra), ranks=ranks)
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
    split = TokenizedSplit.from_cache(cache, tokenizer.pad_token_id, names, SINGLE_LABEL, "max")
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


def require(
    *programs: str,
    install: str = "apt-get install openssh-server pdsh openmpi-bin libopenmpi-dev",
    why_root: str = "the test cluster needs root (sshd in UTS namespaces, /etc/ssh/ssh_config.d)",
    needs_root: bool = True,
) -> None:
    """Skip a test whose prerequisite is missing, saying which; under CI (CI=true) fail instead."""
    path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"  # sshd lives in sbin
    missing = [p for p in programs if not shutil.which(p, path=path)]
    message = ""
    if missing:
        message = f"missing {', '.join(missing)}: {install}"
    elif needs_root and os.geteuid() != 0:
        message = why_root
    if message:
        if in_ci():
            pytest.fail(message)
        pytest.skip(message)


def setup_run(one_rank: dict, tmp_path: Path, micro=2, accum=2, lr=1e-3, stage=2, **options):
    """A `Run` of the tiny model on `one_rank`'s data (the fixture's world of one rank in this
    process), ZeRO `stage`, set up in this process: the in-process tier's real engine."""
    from pipeline.core.options import TrainConfig
    from pipeline.train.run import Run

    cfg = TrainConfig(
        ds_config=str(ds_config(tmp_path / "ds.json", stage, micro=micro, accum=accum, lr=lr)),
        train_file=str(one_rank["train"]),
        dev_file=str(one_rank["dev"]),
        cache_dir=str(one_rank["cache"]),
        output_dir=str(tmp_path),
        run_name="run",
        **{"max_length": 32, "eval_every": 0, "log_every": 1, "report_to": "none", "baseline": "none", **options},
    )
    return Run.setup(cfg)
