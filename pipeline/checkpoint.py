"""Checkpoints and export.

`save` writes a DeepSpeed checkpoint (model, optimizer, scheduler, ZeRO shards) plus our client
state; it must run on every rank. `export_checkpoint` consolidates the fp32 master weights from
the ZeRO shards of any stage 1-3 checkpoint, whatever world size wrote it, into a Hugging Face
model directory (safetensors, config with the label map, tokenizer). An export is written to a
temporary directory and renamed only after it passed its checks, so a directory named `export`
is always complete.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
from pathlib import Path

import torch

EXPORT_WEIGHTS = "model.safetensors"


def save(engine, run_dir: Path, step: int, client_state: dict) -> Path:
    """Save on every rank (DeepSpeed's save is collective); returns the checkpoint directory."""
    root = run_dir / "checkpoints"
    tag = f"step-{step}"
    engine.save_checkpoint(str(root), tag=tag, client_state=client_state)
    return root / tag


def consolidated_fp32_state_dict(checkpoint_dir: Path) -> dict[str, torch.Tensor]:
    """Full fp32 weights from a ZeRO checkpoint directory (one tag), any original world size."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    # zero_to_fp32 prints its progress unconditionally; keep the console to our own lines.
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir.parent), tag=checkpoint_dir.name)
    return {name: tensor.detach().clone().contiguous() for name, tensor in state.items()}


class ExportError(Exception):
    """An export that is incomplete or does not reproduce the trained model."""


def check_export_weights(export_dir: Path) -> None:
    """Refuse empty tensors and architecture keys with no weights (the known ZeRO-3 failure)."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForSequenceClassification

    with safe_open(str(export_dir / EXPORT_WEIGHTS), framework="pt") as f:
        empty = [name for name in f.keys() if 0 in f.get_slice(name).get_shape()]
        saved = set(f.keys())
    if empty:
        raise ExportError(f"{export_dir}: empty tensors in the export: {', '.join(sorted(empty)[:10])}")
    with torch.device("meta"):
        expected = set(AutoModelForSequenceClassification.from_config(AutoConfig.from_pretrained(export_dir)).state_dict())
    missing = expected - saved
    if missing:
        raise ExportError(f"{export_dir}: export lacks {len(missing)} tensors the model needs: {', '.join(sorted(missing)[:10])}")


def load_export(export_dir: str | os.PathLike):
    """Tokenizer and model of an export, in eval mode on the CPU."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(export_dir)
    model = AutoModelForSequenceClassification.from_pretrained(export_dir, dtype=torch.float32)
    return tokenizer, model.eval()


def write_export(checkpoint_dir: Path, model_config, tokenizer, export_dir: Path, verify=None) -> Path:
    """Consolidate `checkpoint_dir` into `export_dir`; `verify(tmp_dir)` may reject the result."""
    from safetensors.torch import save_file

    tmp = export_dir.with_name(export_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(consolidated_fp32_state_dict(checkpoint_dir), str(tmp / EXPORT_WEIGHTS), metadata={"format": "pt"})
    model_config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    labels = [model_config.id2label[i] for i in range(model_config.num_labels)]
    (tmp / "label_map.json").write_text(json.dumps({name: i for i, name in enumerate(labels)}, ensure_ascii=False, indent=2),
                                        encoding="utf-8")
    check_export_weights(tmp)
    if verify is not None:
        verify(tmp)
    shutil.rmtree(export_dir, ignore_errors=True)
    os.replace(tmp, export_dir)
    return export_dir


def logits_tolerance(precision: str) -> float:
    """How far the reloaded fp32 export may be from the live engine's logits.

    fp32: the same weights and arithmetic, up to summation order. 16-bit: the live engine computes
    with 16-bit weights while the export holds the fp32 master weights.
    """
    return 1e-4 if precision == "fp32" else 5e-2


def verify_against_live(probe: dict, live_logits: torch.Tensor, precision: str):
    """A `verify` callback: the reloaded export must reproduce the live engine's probe logits."""

    def verify(export_dir: Path) -> None:
        _, model = load_export(export_dir)
        with torch.no_grad():
            logits = model(**{k: v for k, v in probe.items() if k != "labels"}).logits
        scale = max(1.0, live_logits.abs().max().item())
        diff = (logits - live_logits).abs().max().item()
        if diff > logits_tolerance(precision) * scale:
            raise ExportError(f"{export_dir}: reloaded export differs from the live model on the probe batch "
                              f"(max |logit diff| {diff:.3g} > {logits_tolerance(precision) * scale:.3g})")

    return verify
