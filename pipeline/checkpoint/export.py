"""Export: a checkpoint consolidated into a Hugging Face model directory, verified, atomically.

The export is checked before it is renamed into place: no empty tensors, every tensor the model
needs, and the reloaded model reproduces the logits the live engine gave a few dev records (the
checkpoint's probe).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from .. import tasks
from ..core.base import ConfigError, follow_umask, unique_suffix, write_json
from ..tasks.base import Task
from .checkpoints import (
    HF_DIR,
    MANIFEST,
    PROBE,
    STATE,
    CheckpointError,
    _files,
    checkpoints_near,
    consolidated_fp32_state_dict,
    logits_tolerance,
    read_json,
    require_checkpoint,
    verify_manifest,
    write_manifest,
)
from .model_card import write_model_card

EXPORT_WEIGHTS = "model.safetensors"
EXPORT_OF = "export_of"  # the manifest field that marks an export: {"checkpoint": path, "step": N}


class ExportError(Exception):
    """An export that is incomplete or does not reproduce the trained model."""


def saved_task(model_dir: Path) -> Task:
    """The task of a saved model (an export, a checkpoint's hf/), from its config.json's problem_type."""
    return tasks.by_problem_type(read_json(Path(model_dir) / "config.json").get("problem_type"), str(model_dir))


def check_export_weights(export_dir: Path) -> None:
    """Refuse empty tensors and architecture keys with no weights (the known ZeRO-3 failure)."""
    from safetensors import safe_open
    from transformers import AutoConfig

    with safe_open(str(export_dir / EXPORT_WEIGHTS), framework="pt") as f:
        empty = [name for name in f.keys() if 0 in f.get_slice(name).get_shape()]
        saved = set(f.keys())
    if empty:
        raise ExportError(f"{export_dir}: empty tensors in the export: {', '.join(sorted(empty)[:10])}")
    with torch.device("meta"):
        expected = set(saved_task(export_dir).model_class().from_config(AutoConfig.from_pretrained(export_dir)).state_dict())
    missing = expected - saved
    if missing:
        raise ExportError(f"{export_dir}: export lacks {len(missing)} tensors the model needs: {', '.join(sorted(missing)[:10])}")


def load_export(export_dir: str | os.PathLike):
    """Tokenizer and model of an export, in eval mode on the CPU."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(export_dir)
    model = saved_task(export_dir).model_class().from_pretrained(export_dir, dtype=torch.float32)
    return tokenizer, model.eval()


def verify_probe(export_dir: Path, probe: dict) -> None:
    """The reloaded export must reproduce the logits the live engine gave the probe records."""
    _, model = load_export(export_dir)
    with torch.no_grad():
        logits = saved_task(export_dir).probe_view(model(**{k: torch.tensor(v) for k, v in probe["inputs"].items()}).logits)
    live = torch.tensor(probe["logits"])
    bound = logits_tolerance(probe["precision"]) * max(1.0, live.abs().max().item())
    diff = (logits - live).abs().max().item()
    if diff > bound:
        raise ExportError(
            f"{export_dir}: reloaded export differs from the live model on the probe batch "
            f"(max |logit diff| {diff:.3g} > {bound:.3g})"
        )


def is_export(directory: Path) -> bool:
    """Whether `directory` holds an export and nothing else: its manifest marks it as one (EXPORT_OF)
    and lists every file in it.

    An export written before the marker existed counts when its manifest lists a model
    (config.json, model.safetensors) and no trainer_state.json, which every checkpoint's lists."""
    if not (directory / MANIFEST).is_file():
        return False
    manifest = read_json(directory / MANIFEST)
    listed = set(manifest["files"])
    unmarked_export = {"config.json", EXPORT_WEIGHTS} <= listed and STATE not in listed
    return (EXPORT_OF in manifest or unmarked_export) and set(_files(directory)) <= listed


def require_export_source(ckpt: Path) -> None:
    """`export` reads a complete checkpoint, not an export nor a mistyped path."""
    if is_export(ckpt):
        raise CheckpointError(
            f"export {ckpt}: is an export (a model directory), not a checkpoint; export reads RUN_DIR/checkpoints/step-N; "
            f"{checkpoints_near(ckpt)}"
        )
    require_checkpoint(ckpt, "export")


def check_export_target(export_dir: Path, overwrite: bool) -> None:
    """An export may replace only an earlier export, and only when asked to."""
    if not export_dir.exists() or (export_dir.is_dir() and not any(export_dir.iterdir())):
        return
    if not is_export(export_dir):
        raise ConfigError(
            f"export: {export_dir} exists and is not an export (no manifest.json marks it as one and lists all its files: "
            "a checkpoint, a run directory, files of your own); choose a new or empty directory"
        )
    if not overwrite:
        raise ConfigError(
            f"export: {export_dir} already holds an export; choose a new or empty directory, or pass --overwrite to replace it"
        )


def export_checkpoint(ckpt: Path, export_dir: Path, overwrite: bool = False, thresholds: dict | None = None) -> Path:
    """Consolidate a complete checkpoint into a Hugging Face model directory, verified, atomically.

    Works from the ZeRO-2 or ZeRO-3 shards of any world size. The result is written to a
    temporary sibling and renamed only after its checks pass, so a directory named EXPORT is
    complete; its manifest marks it as an export, the only kind of directory `overwrite` replaces.
    An earlier export is renamed aside before the new one moves in and deleted after, so one of
    them is in place at every moment. Multi-label: `thresholds` (the run's final dev evaluation's)
    replace the checkpoint's.
    """
    from transformers import AutoConfig

    require_export_source(ckpt)
    check_export_target(export_dir, overwrite)
    verify_manifest(ckpt)
    config = AutoConfig.from_pretrained(ckpt / HF_DIR)
    # Names of this process alone: another host's export to the same place may use the same pid.
    suffix = unique_suffix()
    tmp, old = export_dir.with_name(f"{export_dir.name}.tmp-{suffix}"), export_dir.with_name(f"{export_dir.name}.old-{suffix}")
    try:
        _write_export(ckpt, config, tmp, thresholds or read_json(ckpt / STATE).get("thresholds"))
        if export_dir.exists():
            os.replace(export_dir, old)  # an earlier export (checked above) or an empty directory
        os.replace(tmp, export_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)  # a file it cannot delete yet (NFS) leaves EXPORT.old-SUFFIX, never a gap
    return export_dir


def _write_export(ckpt: Path, config, tmp: Path, thresholds: dict | None) -> None:
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    tmp.mkdir(parents=True)
    save_file(consolidated_fp32_state_dict(ckpt), str(tmp / EXPORT_WEIGHTS), metadata={"format": "pt"})
    follow_umask(tmp / EXPORT_WEIGHTS)
    config.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(ckpt / HF_DIR).save_pretrained(tmp)
    task = saved_task(ckpt / HF_DIR)
    names = task.config_label_names(read_json(ckpt / HF_DIR / "config.json"))
    for name, content in task.export_files(names, thresholds).items():
        write_json(tmp / name, content)  # the task's extras: e.g. the label map and decision thresholds
    check_export_weights(tmp)
    verify_probe(tmp, read_json(ckpt / PROBE))
    write_model_card(tmp, ckpt, task, thresholds)
    write_manifest(tmp, **{EXPORT_OF: {"checkpoint": str(ckpt.resolve()), "step": read_json(ckpt / STATE)["optimizer_step"]}})
