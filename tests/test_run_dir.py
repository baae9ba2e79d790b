"""The run directory (train/run.py): who may read what a run writes, one run per directory, and
resumes that keep what was there (issue 31: safe on a shared cluster)."""

from __future__ import annotations

import json
import logging
import os
import stat
import subprocess
import time

import pytest
from helpers import REPO, cpu_env, deepspeed_command, ds_config, read_jsonl, train_args, write_jsonl

from pipeline.checkpoint.checkpoints import CheckpointError, find_resume_checkpoint
from pipeline.core.base import ConfigError, follow_umask
from pipeline.core.options import TrainConfig
from pipeline.train.run import OWNER, new_run_dir, run, warn_readable_by_others
from pipeline.train.runlog import RunLog


@pytest.fixture
def umask_022():
    """The common umask while the test runs (a run narrows the process umask: the test's own is put back)."""
    before = os.umask(0o022)
    yield
    os.umask(before)


class Lines(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def logger() -> tuple[logging.Logger, list[str]]:
    log = logging.getLogger(f"test-run-dir-{time.monotonic_ns()}")
    handler = Lines()
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    return log, handler.lines


def config(tmp_path, data: dict, **options) -> TrainConfig:
    """A 2-step run of the tiny model on `data` in tmp_path/runs (created by the run, its cache in it)."""
    return TrainConfig(
        ds_config=str(ds_config(tmp_path / "ds.json", 2, micro=2, accum=2)),
        train_file=str(data["train"]),
        output_dir=str(tmp_path / "runs"),
        run_name="run",
        **{"max_length": 32, "max_steps": 2, "eval_every": 0, "report_to": "none", "baseline": "none", **options},
    )


def mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("access, closed", [("group", 0o027), ("owner", 0o077)], ids=["group", "owner"])
def test_nothing_a_run_and_its_cache_write_is_open_to_other_users(one_rank, tmp_path, umask_022, access, closed):
    """Under umask 022, a finished run (held-out dev records, predictions, checkpoint probes, export)
    and its tokenized cache: no file or directory open to other users (with owner, nor to the group);
    the export's weights are readable by the group with group access."""
    run(config(tmp_path, one_rank, val_size=0.25, file_access=access))
    runs = tmp_path / "runs"
    written = [runs, *runs.rglob("*")]
    names = {p.name for p in written}
    assert {"data.arrow", "val_split.json", "predictions-dev.jsonl", "probe.json", "model.safetensors"} <= names
    assert {str(p.relative_to(tmp_path)): oct(mode(p)) for p in written if mode(p) & closed} == {}
    weights = runs / "run" / "export" / "model.safetensors"
    assert mode(weights) == 0o666 & ~closed  # as a plain open() would give it, not safetensors' private 0600


def test_an_open_directory_of_patients_text_gets_one_warning_with_the_chmod_that_closes_it(tmp_path):
    """Written with a world-readable umask: one line per directory, naming it and a file in it."""
    cache = tmp_path / "shared cache"
    entry = cache / "train-abc"
    entry.mkdir(parents=True)
    (entry / "data.arrow").write_bytes(b"notes")
    run_dir = tmp_path / "runs" / "old"
    run_dir.mkdir(parents=True)
    (run_dir / "predictions-dev.jsonl").write_text("{}\n")
    for path in (cache, entry, entry / "data.arrow", tmp_path / "runs", run_dir, run_dir / "predictions-dev.jsonl"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    cfg = TrainConfig(output_dir=str(tmp_path / "runs"), cache_dir=str(cache))
    log, lines = logger()
    warn_readable_by_others(cfg, log)
    assert lines == [
        f"warning: {tmp_path / 'runs'} holds patients' text that other users can read (old/predictions-dev.jsonl); "
        f"close it with: chmod -R o-rwx {tmp_path / 'runs'}",
        f"warning: {cache} holds patients' text that other users can read (train-abc/data.arrow); "
        f"close it with: chmod -R o-rwx '{cache}'",
    ]
    for path in (cache, run_dir):
        subprocess.run(["chmod", "-R", "o-rwx", str(path)], check=True)
    lines.clear()
    warn_readable_by_others(cfg, log)
    assert lines == []


def test_follow_umask_gives_a_private_file_a_plain_files_mode_without_touching_the_umask(tmp_path, monkeypatch):
    """The umask is never set, not even for a moment (another thread's file would get that mode)."""
    before = os.umask(0o027)
    try:
        private = tmp_path / "weights"
        private.write_bytes(b"w")
        private.chmod(0o600)
        real, calls = os.umask, []
        monkeypatch.setattr(os, "umask", lambda mask: calls.append(mask) or real(mask))
        follow_umask(private)
        assert mode(private) == 0o640 and calls == [] and [p.name for p in tmp_path.iterdir()] == ["weights"]
    finally:
        os.umask(before)


def test_two_runs_named_from_the_same_second_get_two_directories(tmp_path, monkeypatch):
    """Each is claimed at once (its owner record), not when its first file appears after data preparation."""
    monkeypatch.setattr(time, "strftime", lambda fmt, *_: "run-20270101-000000" if fmt.startswith("run-") else "then")
    cfg = TrainConfig(output_dir=str(tmp_path))
    dirs = [new_run_dir(cfg) for _ in range(3)]
    assert [os.path.basename(d) for d in dirs] == ["run-20270101-000000", "run-20270101-000000-2", "run-20270101-000000-3"]
    assert json.loads((tmp_path / "run-20270101-000000" / OWNER).read_text())["pid"] == os.getpid()


def test_a_run_name_in_use_is_refused_even_while_its_directory_is_empty(tmp_path):
    cfg = TrainConfig(output_dir=str(tmp_path), run_name="exp")
    new_run_dir(cfg)
    with pytest.raises(ConfigError, match=f"run directory {tmp_path / 'exp'} already exists \\(claimed by pid {os.getpid()} on "):
        new_run_dir(cfg)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="empty already exists \\(no owner.json"):
        new_run_dir(TrainConfig(output_dir=str(tmp_path), run_name="empty"))


def test_if_present_reuses_a_run_that_died_before_its_first_checkpoint_but_not_a_finished_one(tmp_path):
    cfg = TrainConfig(output_dir=str(tmp_path), run_name="exp", resume="if-present")
    died = tmp_path / "exp"
    died.mkdir()
    (died / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    assert new_run_dir(cfg) == str(died)
    (died / "eval_results.json").write_text("{}")
    (died / "export").mkdir()
    with pytest.raises(ConfigError, match=r"exp holds a finished run \(eval_results.json, export\) and no complete checkpoint"):
        new_run_dir(cfg)


def test_resume_auto_needs_the_run_name_and_names_the_runs_it_could_mean(tmp_path):
    """A team's shared runs/: the newest checkpoint there may be a colleague's."""
    for run_name in ("mine", "colleagues"):
        ckpt = tmp_path / run_name / "checkpoints" / "step-2"
        ckpt.mkdir(parents=True)
        (ckpt / "manifest.json").write_text('{"files": {}}')
    for spec in ("auto", "if-present"):
        with pytest.raises(CheckpointError, match=f"--resume {spec} needs --run-name.*in {tmp_path}: colleagues, mine$"):
            find_resume_checkpoint(spec, str(tmp_path), "", logging.getLogger("test"))


def test_a_resume_sets_aside_the_metrics_rows_after_its_checkpoint(tmp_path, one_rank):
    """Resumed from step 2 of a run that logged 4 steps: rows 3 and 4 (the branch it abandons) are kept beside."""
    rows = [{"step": n, "loss": 1.0 / n} for n in range(1, 5)] + [{"step": 2, "split": "dev", "loss": 0.4}]
    write_jsonl(tmp_path / "metrics.jsonl", rows)
    RunLog(tmp_path, 10, 2, None).close()
    assert read_jsonl(tmp_path / "metrics.jsonl") == [rows[0], rows[1], rows[4]]
    (aside,) = tmp_path.glob("metrics.superseded-after-step-2-*.jsonl")
    assert read_jsonl(aside) == rows[2:4]


@pytest.mark.ranks
def test_a_second_launch_of_a_run_name_is_refused_while_the_first_prepares_its_data(
    small_data, tmp_path, one_rank, sigusr1_kept, capsys
):
    """The first launch (2 ranks) is held while it prepares its data, its directory still without
    results; the second, with the same --run-name (one rank, in this process), is refused before
    training; the first then finishes."""
    from pipeline.cli.main import main

    config, marker = ds_config(tmp_path / "ds.json", 2, micro=4, accum=2), tmp_path / "paused"
    args = train_args(config, small_data, tmp_path, "run", "--max-steps", "2")
    with open(tmp_path / "first.txt", "w") as console:
        first = subprocess.Popen(
            deepspeed_command(args),
            cwd=REPO,
            env={**cpu_env(), "PIPELINE_TEST_PAUSE_AT": f"data:{marker}"},
            stdout=console,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 240
        while not (marker.is_file() and marker.read_text()):
            assert first.poll() is None and time.monotonic() < deadline, (tmp_path / "first.txt").read_text()[-4000:]
            time.sleep(0.2)
        capsys.readouterr()
        code = main(args)
        second = capsys.readouterr()
        marker.unlink()
        assert first.wait(timeout=240) == 0, (tmp_path / "first.txt").read_text()[-4000:]
    finally:
        first.kill()
    assert code == 2 and "Traceback" not in second.out + second.err
    assert f"run directory {tmp_path / 'run'} already exists (claimed by pid " in second.out + second.err
    assert [row["step"] for row in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "split" not in row] == [1, 2]
