import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from pipeline.checkpoint import ExportError, check_export_weights, load_export, verify_probe


@pytest.fixture()
def export(tmp_path, initial_model):
    target = tmp_path / "export"
    shutil.copytree(initial_model, target)
    return target


def test_complete_export_passes(export):
    check_export_weights(export)


def test_export_with_a_missing_tensor_is_refused(export):
    weights = load_file(export / "model.safetensors")
    del weights["classifier.weight"]
    save_file(weights, export / "model.safetensors")
    with pytest.raises(ExportError, match="lacks 1 tensors the model needs: classifier.weight"):
        check_export_weights(export)


def test_export_with_an_empty_tensor_is_refused(export):
    """ZeRO-3 exports taken from partitioned parameters come out with 0-element tensors."""
    weights = load_file(export / "model.safetensors")
    weights["bert.pooler.dense.weight"] = torch.empty(0)
    save_file(weights, export / "model.safetensors")
    with pytest.raises(ExportError, match="empty tensors in the export: bert.pooler.dense.weight"):
        check_export_weights(export)


def test_export_must_reproduce_live_logits(export):
    tokenizer, model = load_export(export)
    inputs = tokenizer(["主诉：发热", "胸痛两小时"], padding=True, return_tensors="pt")
    with torch.no_grad():
        live = model(**inputs).logits

    def probe(logits, precision):
        return {"precision": precision, "logits": logits.tolist(), "inputs": {k: v.tolist() for k, v in inputs.items()}}

    verify_probe(export, probe(live, "fp32"))
    with pytest.raises(ExportError, match="differs from the live model"):
        verify_probe(export, probe(live + 1e-2, "fp32"))
    verify_probe(export, probe(live + 1e-2, "bf16"))  # 16-bit engines get a looser bound
