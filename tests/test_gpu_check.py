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
    cmd = gpu_check.launch_command(str(tmp_path), gpu_check.V100_CONFIG, "cuda", {})
    port = cmd[cmd.index("--master-port") + 1]
    assert port != "29500" and cmd[cmd.index("--accelerator") + 1] == "cuda"


def test_the_launch_step_uses_the_free_gpu_cuda_visible_devices_names(tmp_path, monkeypatch):
    """CUDA_VISIBLE_DEVICES=3, how a shared node's free GPU is picked: the launcher, given the step's
    command and environment, starts one rank on GPU 3 (DeepSpeed's launch.py then sets the rank's
    CUDA_VISIBLE_DEVICES=3), where `localhost slots=1` was refused (or, bypassed, would take GPU 0)."""
    environ = {"CUDA_VISIBLE_DEVICES": "3,5", "PATH": "/usr/bin"}
    cmd = gpu_check.launch_command(str(tmp_path), gpu_check.V100_CONFIG, "cuda", environ)
    assert "CUDA_VISIBLE_DEVICES" not in gpu_check.launch_env(environ)  # the launcher refuses it beside --include
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    args = launcher.parse_args(cmd[1:])
    assert launcher.launch_hosts(args, {}) == {"localhost": 1}
    assert world_from_hostfile(args.hostfile, args.include, args.exclude) == {"localhost": [3]}
    with pytest.raises(ConfigError, match="CUDA_VISIBLE_DEVICES=GPU-5f1c: the launch step passes its GPU .* as an index"):
        gpu_check.launch_command(str(tmp_path), gpu_check.V100_CONFIG, "cuda", {"CUDA_VISIBLE_DEVICES": "GPU-5f1c"})


@pytest.mark.ranks
def test_gpu_validation_script_runs_on_the_cpu_with_its_launch_step(tmp_path):
    config = ds_config(tmp_path / "fp32.json", 2, micro=4, accum=1)
    note_launch("gpu_check")  # and its ./launch.sh step
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.tools.gpu_check",
            *"--device cpu --layers 2 --hidden 64 --seq 32 --precisions bf16 --stages 2 --steps 8 --warmup 2".split(),
            *("--launch-config", str(config)),
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
    ], result.stdout
    assert any(line.startswith("| bf16 | 2 | True |") for line in result.stdout.splitlines())  # the recompute row
