"""The collective timeout bounds a frozen rank (real ranks, real launcher)."""

import subprocess
import time

import pytest
from helpers import (
    REPO,
    SAMPLE,
    cpu_env,
    deepspeed_command,
    ds_config,
    read_jsonl,
    train_args,
)

pytestmark = pytest.mark.ranks  # every test here launches ranks or trains


def test_the_first_runs_op_builds_are_announced(tmp_path, monkeypatch):
    """DeepSpeed builds its CPU communication op (init_distributed) and the optimizer's op (initialize)
    silently on a machine's first run: we must know when, and where to look if the build never ends."""
    from pipeline.core.dist import build_note, comm_ops

    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))  # a machine that never built them
    assert comm_ops() == ["deepspeed_shm_comm"]
    note = build_note(["deepspeed_shm_comm", "fused_adam"])
    assert note.startswith("note: first DeepSpeed run here: building its deepspeed_shm_comm, fused_adam op")
    assert note.endswith("a lock left by an interrupted build: `python -m pipeline doctor` names it")
    built = tmp_path / "fused_adam"
    built.mkdir(exist_ok=True)
    (built / "fused_adam.so").write_bytes(b"")
    assert "building its deepspeed_shm_comm op" in build_note(["deepspeed_shm_comm", "fused_adam"])
    assert build_note(["fused_adam"]) is None and build_note([]) is None


def test_rank_0s_data_preparation_may_outlast_the_collective_timeout_but_a_frozen_rank_fails_the_job_within_it(
    small_data, tmp_path
):
    """One launch, a 3 s collective timeout, rank 0 held twice by the pause hook. Held in its data
    preparation (while tokenizing) for twice the timeout, the other rank waits in main_first's own
    group (--rank0-wait-minutes) and the job lives on. Held again before step 3's stop vote, alive
    but silent like a hung node, the other rank's collective times out and the job fails."""
    config, log = ds_config(tmp_path / "ds.json", 2, micro=4, accum=2), tmp_path / "job.log"
    preparing, frozen = tmp_path / "preparing", tmp_path / "frozen"
    extra = ["--max-length", "64", "--max-steps", "6", "--eval-every", "0", "--log-every", "1"]
    env = {**cpu_env(), "PIPELINE_TEST_PAUSE_AT": f"tokenize:{preparing},step-3:{frozen}"}
    job = subprocess.Popen(
        deepspeed_command(train_args(config, small_data, tmp_path, "run", *extra, "--dist-timeout-minutes", "0.05")),
        cwd=REPO,
        env=env,
        stdout=open(log, "w"),
        stderr=subprocess.STDOUT,
    )

    def held(marker):  # rank 0's pid is in the marker once it holds
        deadline = time.monotonic() + 180
        while not (marker.is_file() and marker.read_text()):
            assert job.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.1)
        return time.monotonic()

    try:
        held(preparing)
        time.sleep(6)  # twice the collective timeout
        assert job.poll() is None, log.read_text()[-3000:]
        preparing.unlink()
        since = held(frozen)
        while "Timed out waiting" not in log.read_text():  # rank 1's step-3 vote
            assert time.monotonic() - since < 30, log.read_text()[-3000:]
            time.sleep(0.2)
        frozen.unlink()
        assert job.wait(timeout=120) != 0
        assert "data: train" in log.read_text() and "built cache" in log.read_text()
        assert [row["step"] for row in read_jsonl(tmp_path / "run" / "metrics.jsonl")] == [1, 2]
    finally:
        if job.poll() is None:
            job.kill()


def test_a_streamed_stage_gets_its_total_estimated_from_the_share_of_the_file_read(tmp_path):
    """Tokenizing streams a file of unknown record count: the bytes read so far give the ETA."""
    from pipeline.core.dist import Progress
    from pipeline.data.cache import Split
    from pipeline.tasks.single_label import SINGLE_LABEL

    progress = Progress("tokenize", None)
    progress.update(10, estimated_total=100)
    assert progress.bar.total == 100
    progress.update(90, estimated_total=50)  # never below what was counted
    assert progress.bar.total == 100
    split = Split(SAMPLE / "dev.jsonl", "text", "label", SINGLE_LABEL)
    rows = 0
    for rows, _, _ in split.records():
        if rows == 250:  # half the records, about half the bytes
            assert 0.3 < split.read.bytes / (SAMPLE / "dev.jsonl").stat().st_size < 0.7
    assert rows == 500 and split.read.bytes == (SAMPLE / "dev.jsonl").stat().st_size
