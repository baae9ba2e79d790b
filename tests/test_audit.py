"""verify-accumulation on the shipped configs, and on a deliberately broken loop."""

import pytest
from helpers import REPO, pipeline_command

pytestmark = pytest.mark.ranks  # every test here launches ranks or trains

CONFIGS = sorted(str(p.relative_to(REPO)) for p in (REPO / "ds_configs").glob("*.json"))


def verify(*args):
    result = pipeline_command("verify-accumulation", *args, timeout=300)
    return result.returncode, result.stdout + result.stderr


def test_shipped_configs_pass():
    """All five, in fp32: the v100 configs are fp16, which DeepSpeed's CPU accelerator cannot run, so
    on the CPU their accumulation (micro, steps, ZeRO stage, offload) is audited with --precision fp32."""
    # Records of 8 to 16 tokens (the default: 32 to 64): padding still differs between the two layouts,
    # and the v100 configs' 256-record batches take a quarter of the time.
    code, output = verify("--ds-config", *CONFIGS, "--precision", "fp32", "--seq-len", "16")
    assert code == 0, output[-3000:]
    assert output.count("\n  OK") == len(CONFIGS) == 5, output[-3000:]
    # the v100 configs' "auto" accumulation is derived for the one rank here: 256 / 8 = 32 micro-batches
    assert "8 x 32 accumulated vs 256 x 1" in output and "ZeRO-3, fp32" in output


def test_fp16_on_the_cpu_is_refused_with_the_reason():
    code, output = verify("--ds-config", "ds_configs/v100x8_fp16_zero2.json")
    assert code == 2 and "cannot run it (DeepSpeed's CPU accelerator has no fp16)" in output, output[-2000:]


def test_an_extra_loss_division_fails():
    code, output = verify("--ds-config", "ds_configs/small_zero2.json", "--inject-bug", "extra-loss-division")
    assert code == 1, output[-3000:]
    assert "FAILED: accumulation does not equal the big batch" in output
    # 32 records on one rank: 8 x 4 accumulated, and dividing once more leaves a quarter of the gradient
    assert "8 x 4 accumulated vs 32 x 1" in output and "||difference|| / ||gradient|| 0.75 " in output
