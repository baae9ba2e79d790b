"""`zero-pipeline smoke`: the CI check that a cluster's DeepSpeed config, hostfile and data format still
train, save, resume and export, on a tiny model and 2 CPU ranks (docs/ci.md).

    zero-pipeline smoke --ds-config ds_configs/ours.json --hostfile hostfiles/ours [--gpu v100]
        [--train-file data/sample.csv --label-column diagnosis] [--junit smoke.xml]

One line per check, in order, `ok: ...`, `FAILED: ... why` or `skipped: ... why`; a check after a
failed one is not run (the JUnit file lists it as skipped). Exit 0 when no check failed, else 1:
  config  the JSON resolved for the hostfile's world size and the hosts' GPUs (--gpu, else GPUs with
          fp16 and no bf16, as the launcher assumes of GPUs it has not probed) by check-config's
          `resolve_for_hosts`: batch triple, ZeRO settings, precision, optimizer and scheduler;
  data    the first --records records of --train-file (default: the bundled sample), with the run's
          columns and task, read by the pipeline's reader for its format and copied as JSON lines for
          the ranks;
  train   `zero-pipeline launch` of 2 local CPU ranks (the deepspeed runner, DeepSpeed's CPU
          accelerator) with the config as resolved for the hosts: ZeRO stage, offload, micro batch,
          accumulation, optimizer and scheduler; only the world size is 2 instead of the hostfile's,
          and fp16 runs as fp32 (the CPU accelerator has none; bf16 stays). STEPS optimizer steps,
          checkpoints at SAVE_AT and STEPS;
  resume  a second launch from the step-SAVE_AT checkpoint to step STEPS, whose losses and learning
          rates must equal the first run's at those steps;
  export  `export`'s consolidation of the last checkpoint (verified against the checkpoint), and one
          `predict` from it.

The first run is itself the uninterrupted run the resume is compared with: it trained through step
SAVE_AT, saved, and went on. Two steps after the resume, not one: the first step's loss depends on
the restored weights alone, the second one's on the restored optimizer state and schedule too.
A config whose optimizer has no CPU implementation (GPU_ONLY) skips train, resume and export, saying
why. What this does not prove (GPU kernels, NCCL, fp16 loss scaling): docs/ci.md.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from ..cli.check import add_host_arguments, offloads, resolve_for_hosts
from ..core.base import ConfigError
from ..core.ds_config import GPU_CAPABILITY, Hardware, ds_precision, resolve_ds_config
from ..core.options import SAMPLE_DATA_DIR, TINY_MODEL_DIR, TrainConfig

CPU_RANKS = 2
STEPS = 4  # optimizer steps of the first run
SAVE_AT = 2  # the checkpoint the resume starts from
MAX_LENGTH = 32  # tokens per record: enough to exercise the data path, cheap on a CI runner's cores
RUN_NAME = "smoke"
# The hosts' GPUs when --gpu does not name them: fp16 runs on every CUDA GPU, bf16 needs 8.0+.
UNNAMED_GPUS = Hardware("cuda", fp16=True, bf16=False, name="the hosts' GPUs (not named with --gpu: fp16, no bf16)")
CHECKS = ("config", "data", "train", "resume", "export")
RANK_CHECKS = ("train", "resume", "export")  # what a GPU-only optimizer skips
# Optimizers DeepSpeed runs only on GPUs. The CPU accelerator builds FusedAdam, CPU Adam, Adagrad and
# Lion but answers any other op with NotImplementedBuilder (deepspeed/accelerator/cpu_accelerator.py,
# get_op_builder); Lamb is always FusedLamb, Lion without optimizer offload FusedLion
# (runtime/engine.py, _configure_basic_optimizer). The 1-bit optimizers are "GPU-only" (their
# docstrings in runtime/fp16/onebit/ of the versions that have them) and compress gradients over
# NCCL or MPI; DeepSpeed 0.19.8 has none ("is not a supported DeepSpeed Optimizer", engine.py).
ONE_BIT = (
    "a 1-bit optimizer: GPU-only (gradients compressed over NCCL or MPI) in the DeepSpeed versions that "
    "have one; DeepSpeed 0.19 refuses the name"
)
GPU_ONLY = {
    "lamb": "DeepSpeed's Lamb is FusedLamb, a CUDA kernel the CPU accelerator does not build",
    "lion": "DeepSpeed's Lion without optimizer offload is FusedLion, a CUDA kernel the CPU accelerator does not build",
    "onebitadam": ONE_BIT,
    "onebitlamb": ONE_BIT,
    "zerooneadam": ONE_BIT,
}


class Failed(Exception):
    """A check that did not pass: the message is the FAILED line's reason."""


@dataclass
class Result:
    name: str
    status: str  # ok, FAILED or skipped
    detail: str
    seconds: float = 0.0
    trace: str = ""  # the JUnit failure's text: a traceback or a log's tail


def cpu_config(hosts_ds: dict) -> dict:
    """The hosts' resolved config for CPU_RANKS CPU ranks: the same micro batch and accumulation (so
    the global batch shrinks with the world), fp16 off (fp32); everything else as the hosts run it."""
    ds = copy.deepcopy(hosts_ds)
    ds["train_batch_size"] = ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * CPU_RANKS
    ds["fp16"]["enabled"] = False
    return ds


def gpu_only(ds: dict) -> str:
    """Why CPU ranks cannot train with this config ("" when they can)."""
    name = str((ds.get("optimizer") or {}).get("type", "")).lower()
    offloaded = any(line.startswith("optimizer") for line in offloads(ds))
    if name not in GPU_ONLY or (name == "lion" and offloaded):
        return ""
    return f"optimizer {ds['optimizer']['type']}: {GPU_ONLY[name]}"


def section(ds: dict, key: str) -> str:
    return (ds.get(key) or {}).get("type", "none")


@dataclass(frozen=True)
class CpuRun:
    """What the CPU ranks' run exercises: configs alike in these train through the same code."""

    stage: int
    offload: tuple[str, ...]
    precision: str  # the CPU ranks', and the hosts' where it differs ("fp16 as fp32 ...")
    optimizer: str
    scheduler: str
    accumulates: bool

    @classmethod
    def of(cls, hosts_ds: dict, cpu_ds: dict) -> CpuRun:
        host, cpu = ds_precision(hosts_ds), ds_precision(cpu_ds)
        return cls(
            cpu_ds["zero_optimization"].get("stage", 0),
            tuple(offloads(cpu_ds)),
            f"{host} as fp32 (DeepSpeed's CPU accelerator has no fp16)" if host != cpu else cpu,
            section(cpu_ds, "optimizer"),
            section(cpu_ds, "scheduler"),
            cpu_ds["gradient_accumulation_steps"] > 1,
        )

    def __str__(self) -> str:
        return (
            f"ZeRO stage {self.stage}, offload {', '.join(self.offload) or 'none'}, {self.precision}, "
            f"optimizer {self.optimizer}, scheduler {self.scheduler}"
        )


class Smoke:
    """The checks, in order; each returns its `ok` line or raises Failed / ConfigError."""

    def __init__(self, args, out: Path):
        self.args, self.out = args, out
        self.run_dir = out / "runs" / RUN_NAME
        self.cannot_train = ""  # why CPU ranks cannot run this config
        self.first_rows: dict[int, dict] = {}

    def config(self) -> str:
        args = self.args
        hw = Hardware.named(args.gpu) if args.gpu else UNNAMED_GPUS
        resolved, world = resolve_for_hosts(args, hw, args.model)
        ds = resolved.ds
        self.world = sum(len(slots) for slots in world.values())
        self.cpu_ds = cpu_config(ds)
        self.cpu_run = CpuRun.of(ds, self.cpu_ds)
        self.cannot_train = gpu_only(ds)
        if not self.cannot_train:  # as the launcher will check it for the CPU ranks: fails here first
            resolve_ds_config(args.ds_config, self.cpu_ds, CPU_RANKS, Hardware.named("cpu"), TrainConfig(model=args.model))
        warnings = f"; warnings: {' | '.join(resolved.warnings)}" if resolved.warnings else ""
        return (
            f"config: {args.ds_config} for {args.hostfile} ({self.world} ranks on {len(world)} node(s)): "
            f"{ds['train_micro_batch_size_per_gpu']} per rank x {ds['gradient_accumulation_steps']} accumulation x "
            f"{self.world} ranks = {ds['train_batch_size']}, ZeRO stage {self.cpu_run.stage}, offload "
            f"{', '.join(self.cpu_run.offload) or 'none'}, {ds_precision(ds)} on {hw.name}, optimizer "
            f"{self.cpu_run.optimizer}, scheduler {self.cpu_run.scheduler}{warnings}"
        )

    def data(self) -> str:
        from .. import tasks
        from ..data.readers import iter_records, require_columns

        args = self.args
        source = args.train_file or str(SAMPLE_DATA_DIR / "train.jsonl")
        options = dict(text_column=args.text_column, label_column=args.label_column, task=args.task)
        tasks.resolve(TrainConfig(label_separator=args.label_separator, **options))  # the task's own options
        batch = self.cpu_ds["train_batch_size"]
        records = list(itertools.islice(iter_records(source, encoding=args.encoding), args.records or STEPS * batch))
        require_columns(Path(source), records, [args.text_column, args.label_column])
        if len(records) < batch:
            raise Failed(
                f"{source}: {len(records)} records, fewer than one global batch of the CPU ranks ({batch} = "
                f"{self.cpu_ds['train_micro_batch_size_per_gpu']} per rank x {self.cpu_ds['gradient_accumulation_steps']} "
                f"accumulation x {CPU_RANKS} ranks)"
            )
        self.records = records
        self.train_file = self.out / "data" / "train.jsonl"
        self.train_file.parent.mkdir(parents=True)
        self.train_file.write_text("".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in records), "utf-8")
        return (
            f"data: the first {len(records)} records of {source} (columns {args.text_column}, {args.label_column}; "
            f"task {args.task}), copied as JSON lines for the ranks; dev: the same records"
        )

    def launch_args(self) -> list[str]:
        """`zero-pipeline launch` of CPU_RANKS local CPU ranks, without the doctor (the ranks are here)."""
        hostfile = self.out / "hostfile"
        hostfile.write_text(f"localhost slots={CPU_RANKS}\n")
        ds_file = self.out / "ds_config.cpu.json"
        ds_file.write_text(json.dumps(self.cpu_ds, indent=2) + "\n")
        args = self.args
        batch = self.cpu_ds["train_batch_size"]
        options = {
            "hostfile": hostfile,
            "ds-config": ds_file,
            "accelerator": "cpu",
            "train-file": self.train_file,
            "dev-file": self.train_file,
            "text-column": args.text_column,
            "label-column": args.label_column,
            "task": args.task,
            "label-separator": args.label_separator,
            "model": args.model,
            "max-length": args.max_length,
            "max-steps": STEPS,
            "epochs": math.ceil(STEPS / (len(self.records) // batch)),  # enough epochs; --max-steps ends it
            "save-every": SAVE_AT,
            "eval-every": 0,
            "log-every": 1,
            "baseline": "none",
            "report-to": "none",
            "output-dir": self.out / "runs",
            "run-name": RUN_NAME,
            "cache-dir": self.out / "cache",
        }
        pairs = ((f"--{key}", str(value)) for key, value in options.items() if value != "")
        return ["--no-doctor", *itertools.chain.from_iterable(pairs)]

    def launch(self, name: str, extra: list[str]) -> float:
        """One launch, its output in OUT/NAME.log; its seconds, or Failed with the log's last error."""
        log = self.out / f"{name}.log"
        start = time.monotonic()
        code = launch_logged(self.launch_args() + extra, log)
        if code != 0:
            raise Failed(f"{last_error(log)} (exit {code}; log: {log})")
        return time.monotonic() - start

    def train(self) -> str:
        seconds = self.launch("train", [])
        self.first_rows = self.training_rows()
        saved = all((self.run_dir / "checkpoints" / f"step-{s}" / "manifest.json").is_file() for s in (SAVE_AT, STEPS))
        if not saved or sorted(self.first_rows) != list(range(1, STEPS + 1)):
            raise Failed(f"{self.run_dir}: expected steps 1-{STEPS} logged and checkpoints at steps {SAVE_AT} and {STEPS}")
        ds = self.cpu_ds
        return (
            f"train: {STEPS} optimizer steps on {CPU_RANKS} CPU ranks in {seconds:.0f} s, "
            f"{ds['train_micro_batch_size_per_gpu']} per rank x {ds['gradient_accumulation_steps']} accumulation x "
            f"{CPU_RANKS} ranks (the hosts: {self.world}) = {ds['train_batch_size']} per step, {self.cpu_run}; "
            f"checkpoints at steps {SAVE_AT} and {STEPS}; losses "
            + " ".join(f"{self.first_rows[s]['loss']:.4f}" for s in sorted(self.first_rows))
        )

    def resume(self) -> str:
        ckpt = self.run_dir / "checkpoints" / f"step-{SAVE_AT}"
        seconds = self.launch("resume", ["--resume", str(ckpt)])
        rows, later = self.training_rows(), range(SAVE_AT + 1, STEPS + 1)
        differ = [
            f"step {s}: {pick(rows.get(s))} resumed, {pick(self.first_rows[s])} uninterrupted"
            for s in later
            if pick(rows.get(s)) != pick(self.first_rows[s])
        ]
        if differ:
            raise Failed(f"the resumed run differs from the uninterrupted one: {'; '.join(differ)}")
        return (
            f"resume: from {ckpt.name} to step {STEPS} in {seconds:.0f} s: losses and learning rates of steps "
            f"{later[0]}-{later[-1]} equal the uninterrupted run's (" + ", ".join(f"{rows[s]['loss']:.6f}" for s in later) + ")"
        )

    def export(self) -> str:
        from transformers.utils import logging as hf_logging

        from ..checkpoint.export import export_checkpoint
        from ..cli.predict import predict

        hf_logging.disable_progress_bar()  # "Loading weights" bars between the checks' lines
        ckpt = self.run_dir / "checkpoints" / f"step-{STEPS}"
        export_dir = export_checkpoint(ckpt, self.out / "export")
        (row,) = predict(str(export_dir), [self.records[0][self.args.text_column]], device="cpu")
        shown = json.dumps(row, ensure_ascii=False)
        return f"export: {ckpt.name} consolidated and verified in {export_dir}; predict on record 1: {shown[:160]}"

    def training_rows(self) -> dict[int, dict]:
        """The run's metrics.jsonl training rows by step (evaluation rows carry a split)."""
        from ..train.runlog import read_metrics

        return {row["step"]: row for _, row in read_metrics(self.run_dir / "metrics.jsonl", None) if "split" not in row}


def pick(row: dict | None) -> str:
    """A training row's loss and learning rate, exactly."""
    return f"loss {row['loss']!r} lr {row['lr']!r}" if row else "not logged"


def launch_logged(argv: list[str], log: Path) -> int:
    """`zero-pipeline launch ARGV` in this process (Ctrl-C and SIGTERM stop the ranks as the launcher
    does), its output and the ranks' (which inherit this process's descriptors) in `log`; the signal
    handlers it installs are put back afterwards."""
    from ..launch.launcher import main as launch_main

    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        with open(log, "w", encoding="utf-8") as f:
            os.dup2(f.fileno(), 1)
            os.dup2(f.fileno(), 2)
            try:
                return launch_main(argv)
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
    finally:
        for fd, copy_ in zip((1, 2), saved):
            os.dup2(copy_, fd)
            os.close(copy_)
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def log_lines(log: Path) -> list[str]:
    return [line.strip() for line in log.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]


def last_error(log: Path) -> str:
    """The log's last line that reads like an error, else its last line."""
    lines = log_lines(log)
    errors = [line for line in lines if "error" in line.lower() and "exits with return code" not in line]
    return (errors or lines or ["no output"])[-1][-400:]


def run_checks(smoke: Smoke) -> list[Result]:
    """Each check in order, its line printed as it ends. After a failure the rest are skipped
    silently (the JUnit file lists them); a GPU-only config's rank checks are skipped saying why."""
    results = []
    for name in CHECKS:
        failed = next((r.name for r in results if r.status == "FAILED"), "")
        if failed:
            results.append(Result(name, "skipped", f"{name}: not run ({failed} failed)"))
            continue
        if smoke.cannot_train and name in RANK_CHECKS:
            result = Result(name, "skipped", f"{name}: not run on CPU ranks: {smoke.cannot_train}")
        else:
            start = time.monotonic()
            try:
                result = Result(name, "ok", getattr(smoke, name)())
            except (Failed, ConfigError) as e:
                log = smoke.out / f"{name}.log"
                tail = "\n".join(log_lines(log)[-40:]) if log.is_file() else ""
                result = Result(name, "FAILED", f"{name}: {e}", trace=tail)
            except Exception as e:  # a bug, not the user's input: the JUnit file keeps its traceback
                result = Result(name, "FAILED", f"{name}: {type(e).__name__}: {e}", trace=traceback.format_exc())
            result.seconds = time.monotonic() - start
        print(f"{result.status}: {result.detail}", flush=True)
        results.append(result)
    return results


def write_junit(path: Path, results: list[Result], seconds: float) -> None:
    """JUnit XML as GitHub Actions, GitLab CI and Jenkins read it: one test case per check."""
    suite = ET.Element(
        "testsuite",
        name="zero-pipeline smoke",
        tests=str(len(results)),
        failures=str(sum(r.status == "FAILED" for r in results)),
        errors="0",
        skipped=str(sum(r.status == "skipped" for r in results)),
        time=f"{seconds:.1f}",
    )
    for r in results:
        case = ET.SubElement(suite, "testcase", classname="zero-pipeline.smoke", name=r.name, time=f"{r.seconds:.1f}")
        if r.status == "FAILED":
            ET.SubElement(case, "failure", message=r.detail).text = r.trace or r.detail
        elif r.status == "skipped":
            ET.SubElement(case, "skipped", message=r.detail)
        else:
            ET.SubElement(case, "system-out").text = r.detail
    root = ET.Element("testsuites")
    root.append(suite)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    ET.ElementTree(root).write(path, encoding="utf-8", xml_declaration=True)


def output_dir(path: str) -> Path:
    """--output-dir, new or empty (the run in it must be this smoke's), or a new temporary directory."""
    if not path:
        return Path(tempfile.mkdtemp(prefix="zero-pipeline-smoke-"))
    out = Path(path).resolve()  # the launcher runs deepspeed's runner in the run's directory
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--output-dir {path}: not an empty directory; the smoke writes a fresh run there")
    out.mkdir(parents=True, exist_ok=True)
    return out


def add_arguments(p) -> None:
    from .. import tasks

    add_host_arguments(p)
    p.add_argument(
        "--gpu",
        default="",
        help=f"the hosts' GPUs, for the precision check: {', '.join(GPU_CAPABILITY)} or cpu (default: GPUs with fp16, no bf16)",
    )
    p.add_argument("--model", default=str(TINY_MODEL_DIR), help="model directory (default: the bundled tiny BERT)")
    p.add_argument("--train-file", default="", help="the team's data file, any format train reads (default: the bundled sample)")
    p.add_argument("--text-column", default="text")
    p.add_argument("--label-column", default="label")
    p.add_argument("--task", default="single_label", choices=[t for t in tasks.names() if t != "masked_lm"])
    p.add_argument("--label-separator", default="", help="as train's --label-separator (multi_label)")
    p.add_argument("--encoding", default="utf-8", help="text encoding of --train-file (default: %(default)s)")
    p.add_argument(
        "--records",
        type=int,
        default=0,
        help=f"records read from --train-file (default: {STEPS} global batches of the CPU ranks)",
    )
    p.add_argument("--max-length", type=int, default=MAX_LENGTH, help="tokens per record (default: %(default)s)")
    p.add_argument(
        "--output-dir",
        default="",
        help="keep the runs, logs and export here, new or empty (default: a temporary directory, removed when every check passed)",
    )
    p.add_argument("--junit", default="", help="also write the checks as JUnit XML to this file (one test case per check)")


def main(args) -> int:
    # The ranks run on DeepSpeed's CPU accelerator, and so does this process (the export): said, it
    # does not print its "unable to detect" warning into the checks' lines on a machine without GPUs.
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if args.records < 0:
        raise ConfigError(f"--records {args.records}: expected a positive number (0: the default)")
    out = output_dir(args.output_dir)
    start = time.monotonic()
    results = run_checks(Smoke(args, out))
    seconds = time.monotonic() - start
    if args.junit:
        write_junit(Path(args.junit), results, seconds)
    failed = [r.name for r in results if r.status == "FAILED"]
    if not args.output_dir and not set(failed) & set(RANK_CHECKS):  # a rank's failure keeps its logs
        shutil.rmtree(out, ignore_errors=True)
    if failed:
        return 1  # the FAILED line said which check and why
    skipped = sum(r.status == "skipped" for r in results)
    print(f"smoke: {len(results) - skipped} checks passed{f', {skipped} skipped' if skipped else ''} in {seconds:.0f} s")
    return 0
