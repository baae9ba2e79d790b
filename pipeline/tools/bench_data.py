"""Data preparation at hospital scale: time and peak memory of building the tokenized cache for N
generated records, and how long a run that finds the cache warm takes to reach its first step.

    python -m pipeline.tools.bench_data --records 1000000 --out /tmp/bench-data

1. Writes N training records (the sample-data generator's notes, ~370 characters each) and 1,000
   dev records to OUT, once (reused when present).
2. Cold: a fresh process runs rank 0's data preparation (`data.prepare_splits`, tokenizer built
   from the training texts) into an empty cache: wall time and the process's peak RSS.
3. Warm: `./launch.sh`-equivalent `deepspeed --num_gpus 2 --module pipeline train` on 2 CPU ranks
   with that cache: seconds from the command's start to the first optimizer step in metrics.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from .. import tasks
from ..core.options import PACKAGE_DIR, TrainConfig
from .generate_sample_data import LABEL_OF, SEED, class_sequence, make_record

REPO = PACKAGE_DIR.parent
DEV_RECORDS = 1000


def write_records(path: Path, size: int, seed: int) -> None:
    """`size` generated records, written as they are made (never all in memory)."""
    if path.is_file():
        return
    rng = random.Random(seed)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for key in class_sequence(rng, size):
            f.write(json.dumps({"text": make_record(rng, key), "label": LABEL_OF[key]}, ensure_ascii=False) + "\n")
    tmp.rename(path)


def prepare_cold(args) -> None:
    """Child process: rank 0's data preparation into an empty cache; prints time and peak RSS."""
    from ..data.cache import prepare_splits
    from ..data.tokenizer import tokenizer_source

    cfg = TrainConfig(train_file=args.train, dev_file=args.dev, max_length=args.max_length)

    class Log:
        def info(self, line):
            print(line, file=sys.stderr)

    start = time.perf_counter()
    prepare_splits(cfg, tasks.get(cfg.task), tokenizer_source(cfg, args.cache), args.cache, Log())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    print(json.dumps({"seconds": time.perf_counter() - start, "peak_rss_bytes": peak}))


def first_step_seconds(out: Path, train: Path, dev: Path, cache: Path, max_length: int) -> float:
    """Seconds from launching 2 CPU ranks to the first training step in metrics.jsonl."""
    run = out / "runs" / "warm"
    shutil.rmtree(run, ignore_errors=True)
    env = dict(os.environ, DS_ACCELERATOR="cpu")
    with socket.socket() as s:  # a free port: not 29500, which another job may hold
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [
        "deepspeed",
        "--num_gpus",
        "2",
        "--master_port",
        str(port),
        "--module",
        "pipeline",
        "train",
        "--train-file",
        str(train),
    ]
    cmd += ["--dev-file", str(dev), "--cache-dir", str(cache), "--output-dir", str(run.parent), "--run-name", run.name]
    # No TF-IDF baseline: its fit, a third process, would compete with the ranks' start being timed.
    cmd += ["--max-length", str(max_length), "--max-steps", "2", "--eval-every", "0", "--report-to", "none", "--baseline", "none"]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics, seconds = run / "metrics.jsonl", None
    while proc.poll() is None and seconds is None:
        if metrics.is_file() and metrics.read_text(encoding="utf-8").strip():
            seconds = time.perf_counter() - start
        time.sleep(0.1)
    if proc.wait() != 0 or seconds is None:
        raise SystemExit(f"warm run failed (exit {proc.returncode}); rerun `{' '.join(cmd)}` to see why")
    return seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--records", type=int, default=1_000_000)
    p.add_argument("--out", default="/tmp/bench-data")
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument(
        "--warm-only", action="store_true", help="skip the cold preparation: time a warm start on the cache built before"
    )
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--train", help=argparse.SUPPRESS)
    p.add_argument("--dev", help=argparse.SUPPRESS)
    p.add_argument("--cache", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return prepare_cold(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train, dev, cache = out / f"train-{args.records}.jsonl", out / "dev.jsonl", out / "cache"
    start = time.perf_counter()
    write_records(train, args.records, SEED + 7)
    write_records(dev, DEV_RECORDS, SEED + 8)
    print(f"data: {train} ({train.stat().st_size / 1e6:.0f} MB), generated or found in {time.perf_counter() - start:.0f} s")
    results = out / f"result-{args.records}.json"
    result = json.loads(results.read_text()) if args.warm_only else {"records": args.records, "train_bytes": train.stat().st_size}
    if not args.warm_only:
        shutil.rmtree(cache, ignore_errors=True)
        child = [sys.executable, "-m", "pipeline.tools.bench_data", "--child", "--train", str(train), "--dev", str(dev)]
        child += ["--cache", str(cache), "--max-length", str(args.max_length)]
        result["cold"] = json.loads(subprocess.run(child, cwd=REPO, check=True, capture_output=True, text=True).stdout)
        result["load_average_after_cold"] = os.getloadavg()
        results.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"cold preparation: {result['cold']['seconds']:.0f} s, peak RSS {result['cold']['peak_rss_bytes'] / 2**30:.2f} GiB")
    result["warm_first_step_seconds"] = first_step_seconds(out, train, dev, cache, args.max_length)
    result["load_average_after_warm"] = os.getloadavg()
    print(f"warm start: {result['warm_first_step_seconds']:.1f} s from launch to the first optimizer step (2 CPU ranks)")
    results.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
