"""The GPU validation script: everything but CUDA runs here (tiny shape, bf16, the ./launch.sh step on
CPU ranks), so it can pass on its first run on a GPU."""

import json
import subprocess
import sys

import pytest
from deepspeed.runtime.fp16 import loss_scaler
from helpers import REPO, cpu_env, ds_config, note_launch

from pipeline.core.base import ConfigError
from pipeline.launch import launcher
from pipeline.launch.hosts import world_from_hostfile
from pipeline.tools import gpu_check


def scaler(hysteresis: int):
    return loss_scaler.DynamicLossScaler(
        init_scale=2.0**16, scale_window=1000, min_scale=1, delayed_shift=hysteresis, consecutive_hysteresis=False
    )


def test_the_scale_halves_on_the_first_overflow_only_with_the_checks_hysteresis(monkeypatch):
    """DeepSpeed's own scaler (runtime/fp16/loss_scaler.py): with hysteresis 2, its default and the
    shipped configs', the first overflow keeps the scale and only the second halves it."""
    monkeypatch.setattr(loss_scaler.dist, "get_rank", lambda: 0)  # it logs from rank 0; no process group here
    checked = scaler(gpu_check.ds_config("fp16", 2, 8)["fp16"]["hysteresis"])
    checked.update_scale(overflow=True)
    assert checked.cur_scale == 2.0**15
    shipped = json.loads((REPO / "ds_configs" / "v100x8_fp16_zero2.json").read_text())["fp16"]["hysteresis"]
    default = scaler(shipped)
    default.update_scale(overflow=True)
    assert default.cur_scale == 2.0**16
    default.update_scale(overflow=True)
    assert default.cur_scale == 2.0**15


def test_the_launch_step_runs_without_this_processs_rank_variables_on_its_own_port(tmp_path):
    mine = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    assert gpu_check.launch_env({**mine, "PATH": "/usr/bin", "CUDA_HOME": "/usr/local/cuda"}) == {
        "PATH": "/usr/bin",
        "CUDA_HOME": "/usr/local/cuda",
    }
    cmd = gpu_check.launch_command(str(tmp_path), gpu_check.LAUNCH_CONFIG, "cuda", {})
    port = cmd[cmd.index("--master-port") + 1]
    assert port != "29500" and cmd[cmd.index("--accelerator") + 1] == "cuda"


def test_the_launch_step_uses_the_free_gpu_cuda_visible_devices_names(tmp_path, monkeypatch):
    """CUDA_VISIBLE_DEVICES=3, how a shared node's free GPU is picked: the launcher, given the step's
    command and environment, starts one rank on GPU 3 (DeepSpeed's launch.py then sets the rank's
    CUDA_VISIBLE_DEVICES=3), where `localhost slots=1` was refused (or, bypassed, would take GPU 0)."""
    environ = {"CUDA_VISIBLE_DEVICES": "3,5", "PATH": "/usr/bin"}
    cmd = gpu_check.launch_command(str(tmp_path), gpu_check.LAUNCH_CONFIG, "cuda", environ)
    assert "CUDA_VISIBLE_DEVICES" not in gpu_check.launch_env(environ)  # the launcher refuses it beside --include
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    args = launcher.parse_args(cmd[1:])
    assert launcher.launch_hosts(args, {}) == {"localhost": 1}
    assert world_from_hostfile(args.hostfile, args.include, args.exclude) == {"localhost": [3]}
    with pytest.raises(ConfigError, match="CUDA_VISIBLE_DEVICES=GPU-5f1c: the launch step passes its GPU .* as an index"):
        gpu_check.launch_command(str(tmp_path), gpu_check.LAUNCH_CONFIG, "cuda", {"CUDA_VISIBLE_DEVICES": "GPU-5f1c"})


@pytest.mark.ranks
def test_gpu_validation_script_runs_on_the_cpu_with_its_launch_step(tmp_path):
    config = ds_config(tmp_path / "fp32.json", 2, micro=4, accum=1)
    note_launch("gpu_check")  # and its ./launch.sh step (the resume's second launch is the GPU's alone)
    report = tmp_path / "report.json"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.tools.gpu_check",
            *"--device cpu --layers 2 --hidden 64 --seq 32 --precisions bf16 --stages 2 --steps 16 --warmup 2".split(),
            *("--lr", "3e-3", "--no-resume", "--launch-config", str(config), "--report", str(report)),
        ],
        cwd=REPO,
        env=cpu_env(),
        capture_output=True,
        text=True,
        timeout=480,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    checks = [line for line in result.stdout.splitlines() if line.startswith(("ok  ", "FAILED"))]
    assert [line.split(":")[0] for line in checks] == [
        "ok      bf16 ZeRO-2",
        "ok      bf16 ZeRO-2 recompute",
        f"ok      ./launch.sh {config} on this cpu",
        "ok      predict --device cpu --precision bf16 agrees with fp32",
    ], result.stdout
    assert any(line.startswith("| bf16 | 2 | True |") for line in result.stdout.splitlines())  # the recompute row
    commands = [line for line in result.stdout.splitlines() if line.startswith("$ ")]
    assert commands[0].startswith(f"$ {REPO / 'launch.sh'} --hostfile ") and len(commands) == 3  # launch, 2 x predict
    assert [c["ok"] for c in json.loads(report.read_text())["checks"]] == [True] * 4


def test_the_labels_are_learnable_and_a_step_that_changes_nothing_fails_the_check(one_rank, tmp_path):
    """gpu_check in this process (CPU, a tiny shape): a few steps on its labels bring the loss well
    down, and the report says so; at a learning rate of 0, steps that change nothing, the check fails."""
    from pipeline.core import dist

    dist.init(timeout_minutes=1)
    tiny = "--device cpu --layers 2 --hidden 64 --seq 32 --micro 4 --precisions fp32 --stages 2 --steps 8 --warmup 2"
    report = tmp_path / "report.json"
    assert gpu_check.main([*tiny.split(), "--lr", "1e-2", "--no-launch", "--report", str(report)]) == 0
    written = json.loads(report.read_text())
    assert [c["check"] for c in written["checks"]] == ["fp32 ZeRO-2: loss fell", "fp32 ZeRO-2 recompute: loss fell"]
    assert written["passed"] and written["machine"]["device"] == "cpu" and len(written["rows"]) == 2
    first, last = written["rows"][0]["loss_first_last"]
    assert last <= gpu_check.FELL * first
    still = gpu_check.parse_args([*tiny.split(), "--lr", "0"])
    (tmp_path / "model").mkdir()
    row = gpu_check.run_config(still, gpu_check.model_dir(still, str(tmp_path / "model")), "fp32", 2)
    assert not row["loss_fell"], row["loss_first_last"]
    # A drop that dropout's noise or a nearly idle step gives is not "fell": only a clear one is.
    assert not gpu_check.loss_fell([0.69] * 4 + [0.66] * 4) and gpu_check.loss_fell([0.69] * 4 + [0.45] * 4)
    assert not gpu_check.loss_fell([1.41] * 4 + [0.72] * 4)  # back to chance from a bad start (BERT-large's, on CPU)


def test_the_peak_is_the_cards_own_pcie_and_nvl_below_sxm():
    names = {
        "NVIDIA H100 80GB HBM3": 989e12,
        "NVIDIA H100 PCIe": 756e12,
        "NVIDIA H100 NVL": 835e12,
        "NVIDIA H200": 989e12,
        "NVIDIA H200 NVL": 835e12,
        "NVIDIA A100-SXM4-80GB": 312e12,
        "NVIDIA A100 80GB PCIe": 312e12,
        "Tesla V100-SXM2-16GB": 125e12,
        "Tesla V100-PCIE-16GB": 112e12,
        "Tesla V100S-PCIE-32GB": 130e12,
    }
    assert {name: gpu_check.peak_flops(name) for name in names} == names
    assert gpu_check.peak_flops("NVIDIA GeForce RTX 4090") is None  # no MFU rather than a wrong one


def test_predictions_at_each_precision_are_compared_with_fp32s(initial_model):
    """The predict check on an export here (CPU: fp32 and bf16), and what counts as disagreeing."""
    checks = gpu_check.Checks()
    gpu_check.predict_check(initial_model, "cpu", checks)
    assert [(c["check"], c["ok"]) for c in checks.checks] == [("predict --device cpu --precision bf16 agrees with fp32", True)]
    assert checks.commands[1].startswith(f"python -m pipeline predict --model {initial_model} --device cpu --precision bf16")
    assert gpu_check.predict_precisions("cpu") == ["fp32", "bf16"]
    ref = [{"label": "a", "probabilities": {"a": 0.9, "b": 0.1}}, {"label": "a", "probabilities": {"a": 0.505, "b": 0.495}}]
    near_tie = [{"label": "a", "probabilities": {"a": 0.9, "b": 0.1}}, {"label": "b", "probabilities": {"a": 0.499, "b": 0.501}}]
    assert gpu_check.disagreement(ref, near_tie, 0.01) == (pytest.approx(0.006), 0)  # a tie may go either way
    flipped = [{"label": "b", "probabilities": {"a": 0.4, "b": 0.6}}, ref[1]]
    assert gpu_check.disagreement(ref, flipped, 0.01) == (pytest.approx(0.5), 1)
