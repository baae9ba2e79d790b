"""The GPU validation script runs end to end on the CPU (tiny shape, bf16), so it is ready when a GPU is."""

import subprocess
import sys

import pytest
from helpers import REPO, cpu_env

pytestmark = pytest.mark.slow  # every test here launches ranks or trains


def test_gpu_validation_script_runs_on_the_cpu():
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.tools.gpu_check",
            "--device",
            "cpu",
            "--layers",
            "2",
            "--hidden",
            "64",
            "--seq",
            "32",
            "--precisions",
            "bf16",
            "--stages",
            "2",
            "--steps",
            "6",
            "--warmup",
            "2",
            "--no-launch",
        ],
        cwd=REPO,
        env=cpu_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    lines = result.stdout.splitlines()
    assert "| precision | zero | recompute |" in "\n".join(lines)
    assert any(line.startswith("| bf16 | 2 | True |") for line in lines)  # the gradient-checkpointing row
    assert "ok      bf16 ZeRO-2: loss fell" in lines
