"""Checkpoints and resume with real ranks: a resumed run equals the uninterrupted one, bit for bit."""
import json
import shutil
import signal
import subprocess
import sys
import time

import psutil
import pytest
from safetensors.numpy import load_file

from pipeline.checkpoint import step_of

from conftest import REPO, cpu_env, ds_config, free_port, launch, losses, read_jsonl

pytestmark = pytest.mark.slow  # every test here launches ranks or trains

# 256 records / (4 x 2 x 2 ranks) = 16 optimizer steps per epoch, 2 epochs; dropout on (tiny-bert).
RUN_ARGS = ["--max-length", "64", "--eval-batch-size", "8", "--epochs", "2", "--eval-every", "0",
            "--save-every", "2", "--keep-checkpoints", "20"]


def train_args(config, data, tmp_path, *extra):
    return ["train", "--ds-config", str(config), "--train-file", str(data["train"]), "--dev-file", str(data["dev"]),
            "--output-dir", str(tmp_path), "--cache-dir", str(tmp_path / "cache"), *RUN_ARGS, *extra]



def assert_same_run(run, reference):
    assert losses(run) == losses(reference)
    mine, theirs = load_file(run / "export" / "model.safetensors"), load_file(reference / "export" / "model.safetensors")
    assert all((mine[k] == theirs[k]).all() for k in theirs)
    assert (run / "predictions-dev.jsonl").read_text() == (reference / "predictions-dev.jsonl").read_text()


def interrupted_copy(reference, target, last_step):
    """The reference run as it would be if it had died right after saving step `last_step`."""
    shutil.copytree(reference, target)
    shutil.rmtree(target / "export")
    for ckpt in (target / "checkpoints").glob("step-*"):
        if step_of(ckpt) > last_step:
            shutil.rmtree(ckpt)
    return target


@pytest.fixture(scope="module")
def reference(tmp_path_factory, small_data):
    runs = {}

    def get(stage):
        if stage not in runs:
            tmp = tmp_path_factory.mktemp(f"ref-zero{stage}")
            config = ds_config(tmp / "ds.json", stage, micro=4, accum=2, lr=3e-3)
            result = launch(train_args(config, small_data, tmp, "--run-name", "ref"))
            assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
            runs[stage] = (tmp / "ref", config)
        return runs[stage]

    return get


@pytest.mark.parametrize("stage", [2, 3])
@pytest.mark.parametrize("last_step", [6, 16], ids=["mid-epoch", "epoch-boundary"])
def test_resume_equals_uninterrupted(reference, small_data, tmp_path, stage, last_step):
    ref, config = reference(stage)
    copy = interrupted_copy(ref, tmp_path / "interrupted", last_step)
    result = launch(train_args(config, small_data, tmp_path, "--resume", str(copy / "checkpoints" / f"step-{last_step}")))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    state = json.loads((copy / "checkpoints" / f"step-{last_step}" / "trainer_state.json").read_text())
    assert (state["epoch"], state["step_in_epoch"]) == ((0, 6) if last_step == 6 else (1, 0))
    assert f"resumed from {copy / 'checkpoints' / f'step-{last_step}'}" in result.stdout
    assert_same_run(copy, ref)


def _rank_processes(launcher: subprocess.Popen):
    return [p for p in psutil.Process(launcher.pid).children(recursive=True) if "--local_rank=1" in " ".join(p.cmdline())]


def test_sigkill_during_a_save_leaves_a_partial_that_resume_auto_skips(reference, small_data, tmp_path):
    """Kill rank 1 while a checkpoint is being written: the job fails fast, the half-written
    checkpoint is never resumed from, and `--resume auto` finishes the run exactly as if uninterrupted."""
    ref, config = reference(2)
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), "--module", "pipeline",
           *train_args(config, small_data, tmp_path, "--run-name", "killed", "--save-every", "1", "--dist-timeout-minutes", "0.5")]
    log = open(tmp_path / "killed.log", "w")
    job = subprocess.Popen(cmd, cwd=REPO, env=cpu_env(), stdout=log, stderr=subprocess.STDOUT)
    ckpts = tmp_path / "killed" / "checkpoints"

    def being_written():
        return [p for p in ckpts.glob("step-*") if step_of(p) >= 10 and not (p / "manifest.json").exists()]

    deadline = time.time() + 240
    while not being_written() and job.poll() is None and time.time() < deadline:
        time.sleep(0.001)
    assert job.poll() is None, "the run ended before it could be killed:\n" + (tmp_path / "killed.log").read_text()[-3000:]
    killed_at = time.time()
    for p in _rank_processes(job):
        p.send_signal(signal.SIGKILL)
    assert job.wait(timeout=60) != 0
    assert time.time() - killed_at < 60
    partial = [p for p in ckpts.glob("step-*") if not (p / "manifest.json").exists()]
    assert len(partial) == 1, "the kill did not land inside a save"
    newest_complete = ckpts / f"step-{step_of(partial[0]) - 1}"
    assert (newest_complete / "manifest.json").exists()

    result = launch(train_args(config, small_data, tmp_path, "--run-name", "killed", "--resume", "auto"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"ignoring incomplete checkpoint {partial[0]}" in result.stdout + result.stderr
    assert f"resumed from {newest_complete}" in result.stdout
    assert_same_run(tmp_path / "killed", ref)


def test_export_from_zero3_shards_reproduces_the_training_predictions(reference, small_data, tmp_path):
    ref, _ = reference(3)
    out = tmp_path / "exported"
    subprocess.run([sys.executable, "-m", "pipeline", "export", str(ref / "checkpoints" / "step-32"), str(out)],
                   cwd=REPO, env=cpu_env(), check=True, capture_output=True)
    mine, theirs = load_file(out / "model.safetensors"), load_file(ref / "export" / "model.safetensors")
    assert mine.keys() == theirs.keys() and all((mine[k] == theirs[k]).all() for k in theirs)
    predicted = subprocess.run([sys.executable, "-m", "pipeline", "predict", "--model", str(out), "--input",
                                str(small_data["dev"])], cwd=REPO, env=cpu_env(), check=True, capture_output=True, text=True)
    labels = [json.loads(line)["label"] for line in predicted.stdout.splitlines()]
    assert labels == [row["label"] for row in read_jsonl(ref / "predictions-dev.jsonl")]


@pytest.mark.parametrize("stage, before, after", [(2, 2, 1), (2, 1, 2), (3, 2, 1)],
                         ids=["zero2-2-to-1-ranks", "zero2-1-to-2-ranks", "zero3-2-to-1-ranks"])
def test_resume_on_another_world_size_keeps_the_global_batch(initial_model, small_data, tmp_path, stage, before, after):
    """ZeRO-2 (which DeepSpeed's own universal-checkpoint tests do not cover) and ZeRO-3, through the
    universal format.

    The model has no dropout, so the only difference from the uninterrupted run left is the order
    of floating-point reductions: losses and weights must agree to float32 rounding."""
    accum = {2: 2, 1: 4}  # 4 per rank x accum x ranks = 16
    config = ds_config(tmp_path / "ds.json", stage, micro=4, accum=accum[before])
    args = ("--model", str(initial_model), "--epochs", "1")
    result = launch(train_args(config, small_data, tmp_path, "--run-name", "ref", *args), ranks=before)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ref = tmp_path / "ref"
    copy = interrupted_copy(ref, tmp_path / "interrupted", 6)
    # The same JSON on the new world size: the run must re-derive accumulation to keep 16.
    result = launch(train_args(config, small_data, tmp_path, "--resume", str(copy / "checkpoints" / "step-6"), *args),
                    ranks=after)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert f"global batch kept at 16 = 4 x {accum[after]} accumulation x {after}" in output
    assert "not carried over: each rank's RNG state" in output
    resolved = json.loads((copy / "ds_config.json").read_text())
    assert (resolved["train_batch_size"], resolved["gradient_accumulation_steps"], resolved["world_size"]) == (16, accum[after], after)
    assert resolved["zero_optimization"]["stage"] == stage and (copy / "checkpoints" / "step-6.universal").is_dir()
    resumed, reference_curve = losses(copy), losses(ref)
    assert len(resumed) == len(reference_curve) == 16
    assert max(abs(a - b) for a, b in zip(resumed, reference_curve)) < 1e-5, (resumed, reference_curve)
    mine, theirs = load_file(copy / "export" / "model.safetensors"), load_file(ref / "export" / "model.safetensors")
    assert max(abs(mine[k] - theirs[k]).max() for k in theirs) < 1e-5
