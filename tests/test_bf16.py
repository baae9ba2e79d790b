"""Where bf16 support is decided (core.ds_config.native_bf16: training's precision, gpu_check's rows,
predict --precision bf16), on a stand-in GPU: this CPU build of torch reports a compute capability
given here, and torch.cuda.is_bf16_supported runs unchanged on it."""

from types import SimpleNamespace

import pytest
import torch

from pipeline.cli.predict import choose_device
from pipeline.core.base import ConfigError
from pipeline.core.ds_config import Hardware


@pytest.fixture()
def gpu(monkeypatch):
    """`use(name, major, minor)`: one visible GPU of that compute capability, on which a bf16
    tensor can be made (as on a V100, where torch emulates bf16)."""

    def use(name: str, major: int, minor: int) -> None:
        monkeypatch.delenv("DS_ACCELERATOR", raising=False)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (major, minor))
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: SimpleNamespace(major=major, minor=minor))
        monkeypatch.setattr(torch.cuda, "_check_bf16_tensor_supported", lambda device: True)  # the emulation's probe

    return use


def test_bf16_is_native_from_compute_capability_8(gpu):
    gpu("Tesla V100-SXM2-32GB", 7, 0)
    assert torch.cuda.is_bf16_supported()  # what torch says by default: emulation counts
    assert not Hardware.detect().bf16
    gpu("NVIDIA H100 80GB HBM3", 9, 0)
    assert Hardware.detect().bf16


def test_predict_refuses_bf16_on_a_gpu_without_native_bf16(gpu):
    gpu("Tesla V100-SXM2-32GB", 7, 0)
    message = r"--precision bf16: Tesla V100-SXM2-32GB \(compute capability 7.0\) has no native bf16 .*; use fp16 or fp32"
    with pytest.raises(ConfigError, match=message):
        choose_device("cuda", "bf16")
    assert choose_device("cuda", "fp16").type == "cuda"
    gpu("NVIDIA A100-SXM4-40GB", 8, 0)
    assert choose_device("cuda", "bf16").type == "cuda"
