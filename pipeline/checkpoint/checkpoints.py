"""Checkpoints users can trust: complete-or-ignored saves, exact resume, and verified export.

A checkpoint is `RUN_DIR/checkpoints/step-N/`: DeepSpeed's own files (model, optimizer, scheduler,
ZeRO shards) plus ours, all JSON, none unpickled by us:

    trainer_state.json  epoch, position in the epoch's data order, optimizer step, best metric, configs
    rng-rankR.json      Python, NumPy and torch RNG states of rank R (dropout continues exactly)
    hf/                 model config (with label map) and tokenizer: the checkpoint exports on its own
    probe.json          a few dev records and the logits the live engine gave them
    manifest.json       every file's size and SHA-256, written last by rank 0 after all ranks finished

Only a checkpoint with a manifest that matches its files is ever loaded; anything else is a partial
save (a crash or kill mid-write) and is reported and skipped. DeepSpeed's own `latest` file is not
written or used: it is written by rank 0 without waiting for the other ranks' shards.

Loading a DeepSpeed checkpoint unpickles it (`torch.load(weights_only=False)`), which can run code:
load only checkpoints you trust. The manifest check happens before anything is unpickled.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from ..core import dist
from ..core.base import ConfigError, file_digest, unique_suffix, write_json
from ..core.stop import pause_for_test

CHECKPOINTS = "checkpoints"
MANIFEST = "manifest.json"
STATE = "trainer_state.json"
HF_DIR = "hf"
PROBE = "probe.json"


class CheckpointError(ConfigError):
    """A checkpoint that is incomplete, corrupted, or does not fit the run that wants to load it."""


def read_json(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


# ----------------------------------------------------------------------------------------------
# RNG state, per rank, as JSON
# ----------------------------------------------------------------------------------------------


def rng_state() -> dict:
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [name, keys.tolist(), pos, has_gauss, cached],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        # The rank's own device only: a list of every visible GPU's state (get_rng_state_all) would
        # not fit a resume that sees another set of GPUs (srun --gpus-per-task, other nodes).
        state["cuda_device"] = torch.cuda.get_rng_state().tolist()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if torch.cuda.is_available() and (cuda := cuda_rng_state(state)) is not None:
        torch.cuda.set_rng_state(torch.tensor(cuda, dtype=torch.uint8))


def cuda_rng_state(state: dict) -> list[int] | None:
    """This rank's CUDA RNG state in a saved record, or None where it holds none for this device.

    Older checkpoints hold "cuda", one state per GPU the rank saw, its own at its device index: the
    entry at the current device index is that one under the same layout. A list too short for that
    index (saved under srun --gpus-per-task, resumed by a rank on device 3) restores none: dropout on
    the GPU then differs from an uninterrupted run, nothing else does."""
    if "cuda_device" in state:
        return state["cuda_device"]
    per_device, index = state.get("cuda", []), torch.cuda.current_device()
    if index < len(per_device):
        return per_device[index]
    return None


# ----------------------------------------------------------------------------------------------
# Manifest
# ----------------------------------------------------------------------------------------------


def _files(ckpt: Path) -> list[str]:
    return sorted(str(p.relative_to(ckpt)) for p in ckpt.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(ckpt: Path, reported: tuple[str, ...] | list[str] = (), **fields) -> None:
    """The manifest of the files the ranks `reported` writing, and those this rank sees (its own),
    plus `fields` (an export's marker).

    Not a listing alone: on NFS this node's cached directory listing can miss another node's
    shards for tens of seconds, while opening a file by its name finds it."""
    names = sorted(set(reported) | set(_files(ckpt)))
    files = {name: {"size": (ckpt / name).stat().st_size, "sha256": file_digest(ckpt / name)} for name in names}
    write_json(ckpt / MANIFEST, {"files": files, **fields})


def require_manifest(ckpt: Path) -> None:
    if not (ckpt / MANIFEST).is_file():
        raise CheckpointError(f"{ckpt}: incomplete checkpoint (no {MANIFEST}: its save was interrupted)")


def verify_manifest(ckpt: Path) -> None:
    """Every file listed, with its size and checksum, and nothing else; checked before unpickling."""
    require_manifest(ckpt)
    listed = read_json(ckpt / MANIFEST)["files"]
    present = set(_files(ckpt))
    problems = [f"missing {name}" for name in sorted(set(listed) - present)]
    problems += [f"unexpected {name}" for name in sorted(present - set(listed))]
    for name in sorted(set(listed) & present):
        if (ckpt / name).stat().st_size != listed[name]["size"] or file_digest(ckpt / name) != listed[name]["sha256"]:
            problems.append(f"{name} does not match its checksum")
    if problems:
        raise CheckpointError(f"{ckpt}: corrupted checkpoint, refused before loading: {'; '.join(problems)}")


def step_of(ckpt: Path) -> int:
    match = re.fullmatch(r"step-(\d+)", ckpt.name)
    return int(match.group(1)) if match else -1


def require_checkpoint(ckpt: Path, what: str) -> None:
    """`ckpt` is a complete checkpoint, else a clear error: no such directory or not a checkpoint
    (naming the complete checkpoints beside it or in it), or a save that was interrupted."""
    if (ckpt / STATE).is_file() or (ckpt.is_dir() and step_of(ckpt) >= 0):
        require_manifest(ckpt)  # a checkpoint, complete or not; verify_manifest checks its files
        return
    problem = "does not exist" if not ckpt.exists() else "is not a checkpoint (it has no trainer_state.json)"
    raise CheckpointError(f"{what} {ckpt}: {problem}; {checkpoints_near(ckpt)}")


def checkpoints_near(path: Path) -> str:
    """The complete checkpoints beside `path` or in it (a run directory's), for a message."""
    for root in (path.parent, path.parent / CHECKPOINTS, path / CHECKPOINTS):
        complete = scan(root)[0]
        if complete:
            return f"complete checkpoints in {root}: {', '.join(p.name for p in reversed(complete))}"
    return f"no complete checkpoint (RUN_DIR/{CHECKPOINTS}/step-N) in {path.parent}"


def scan(root: Path) -> tuple[list[Path], list[Path]]:
    """(complete, partial) checkpoint directories under `root`, newest first."""
    dirs = sorted((p for p in root.glob("step-*") if p.is_dir() and step_of(p) >= 0), key=step_of, reverse=True)
    return [p for p in dirs if (p / MANIFEST).is_file()], [p for p in dirs if not (p / MANIFEST).is_file()]


def find_resume_checkpoint(spec: str, output_dir: str, run_name: str, log) -> Path | None:
    """The checkpoint `--resume` names: a path, or 'auto'/'if-present' for the newest complete one of run `run_name`.

    'auto' with nothing to resume is an error (DeepSpeed alone would silently start from scratch);
    'if-present' then starts a fresh run.
    """
    if spec not in ("auto", "if-present"):
        ckpt = Path(spec)
        if not ckpt.is_dir():
            raise CheckpointError(f"--resume {spec}: no such checkpoint directory")
        require_manifest(ckpt)  # the full checksum check runs once, in load()
        return ckpt
    if not run_name:
        # As Hugging Face's resume_from_checkpoint=True looks in its own output_dir (one run's), 'auto'
        # resumes one named run: the newest checkpoint in a shared runs/ may be a colleague's run.
        runs = sorted(p.parent.name for p in Path(output_dir).glob(f"*/{CHECKPOINTS}") if scan(p)[0])
        raise CheckpointError(
            f"--resume {spec} needs --run-name, the run to continue; runs with complete checkpoints in {output_dir}: "
            f"{', '.join(runs) or 'none'}"
        )
    complete, partial = scan(Path(output_dir) / run_name / CHECKPOINTS)
    for p in partial:
        log.warning(f"ignoring incomplete checkpoint {p} (no manifest: its save was interrupted)")
    if complete:
        return max(complete, key=lambda p: (p / MANIFEST).stat().st_mtime)
    if spec == "auto":
        raise CheckpointError(
            f"--resume auto: no complete checkpoint under {Path(output_dir) / run_name}"
            f"{f' ({len(partial)} incomplete ones ignored)' if partial else ''}; "
            "use --resume if-present to start fresh when there is none"
        )
    return None


def check_same_data(ckpt: Path, saved, current: dict, log) -> None:
    """A resume continues the saved position in the epoch's data order; on other data that position
    means other batches, or lies beyond the epoch's end."""
    if not saved.train_data:
        log.warning(f"{ckpt}: saved before checkpoints recorded their training data; not checked against this run's")
        return
    changed = [
        f"{key} {saved.train_data.get(key)!r} -> {value!r}"
        for key, value in current.items()
        if saved.train_data.get(key) != value
    ]
    if changed:
        raise CheckpointError(
            f"{ckpt}: the training data differs from the checkpoint's ({'; '.join(changed)}); resume "
            "with the data it was trained on, or start a new run"
        )


RESUME_SETTINGS = ("seed", "group_by_length", "best_metric")  # the data order; what the saved best value measures
# A checkpoint written before one of them existed was trained as with this value (grouping came later, off).
BEFORE_IT_EXISTED = {"group_by_length": 0}


def check_same_settings(ckpt: Path, saved, current: dict) -> None:
    """A resume keeps the settings its saved position and best value depend on (`current`: this run's train_config)."""
    was = {key: saved.train_config.get(key, BEFORE_IT_EXISTED.get(key, current[key])) for key in RESUME_SETTINGS}
    changed = [
        f"--{key.replace('_', '-')} {was[key]!r} -> {current[key]!r}" for key in RESUME_SETTINGS if was[key] != current[key]
    ]
    if changed:
        raise CheckpointError(
            f"{ckpt}: resumed with other settings than it was trained with ({'; '.join(changed)}): the seed "
            "and --group-by-length fix the data order and the saved best value is one of --best-metric; resume with the checkpoint's, or start a new run"
        )


def check_compatible(ckpt: Path, state, label_names: list[str], model_config, class_weights: dict) -> None:
    """The checkpoint (its trainer state `state`) belongs to this model, task (problem_type), label
    set and loss (class weights) (JSON only)."""
    if state.label_names != label_names:
        raise CheckpointError(f"{ckpt}: trained with labels {state.label_names}, but the data has {label_names}")
    if state.class_weights != class_weights:
        raise CheckpointError(
            f"{ckpt}: trained with class weights {state.class_weights or 'none'}, but this run has {class_weights or 'none'}; "
            "resume with the --class-weights it was trained with"
        )
    saved = read_json(ckpt / HF_DIR / "config.json")
    current = model_config.to_dict()
    keys = (
        "model_type",
        "problem_type",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "intermediate_size",
        "vocab_size",
    )
    differ = [f"{k}: checkpoint {saved.get(k)} vs model {current.get(k)}" for k in keys if saved.get(k) != current.get(k)]
    if differ:
        raise CheckpointError(f"{ckpt}: checkpoint is of a different model ({'; '.join(differ)})")


# ----------------------------------------------------------------------------------------------
# Save and load (every rank)
# ----------------------------------------------------------------------------------------------


def save(engine, run_dir: Path, state, tokenizer, probe: dict, probe_logits, precision: str, keep: int) -> Path:
    """Save a checkpoint on every rank; it becomes visible to resume only when complete.

    `state` is the loop's TrainerState (saved as JSON); `probe_logits()` gives the live engine's
    logits of the `probe` records, for the export to reproduce (every rank: a ZeRO-3 forward is
    collective)."""
    root = run_dir / CHECKPOINTS
    ckpt = root / f"step-{state.optimizer_step}"
    if dist.main_first(lambda: (ckpt / MANIFEST).is_file()):
        # Only the checkpoint a run resumed from and has not trained past (later ones were moved
        # aside at resume): never rewrite a complete checkpoint, but it must hold these weights.
        saved = torch.tensor(dist.main_first(lambda: read_json(ckpt / PROBE)["logits"]))
        live = probe_logits()
        if (live - saved).abs().max().item() > logits_tolerance(precision) * max(1.0, saved.abs().max().item()):
            raise CheckpointError(f"{ckpt} exists and holds other weights than this run's; move it aside and resume again")
        return ckpt
    needed, free = dist.main_first(lambda: require_space(run_dir, state.optimizer_step, space_needed(root, engine)))
    logits = probe_logits()
    dist.main_first(lambda: shutil.rmtree(ckpt, ignore_errors=True))  # a partial left by a crash

    def finish():
        write_json(ckpt / STATE, asdict(state))
        engine.module.config.save_pretrained(ckpt / HF_DIR)
        tokenizer.save_pretrained(ckpt / HF_DIR)
        write_json(
            ckpt / PROBE,
            {
                "precision": precision,
                "logits": logits.tolist(),
                "inputs": {k: v.tolist() for k, v in probe.items() if k != "labels"},
            },
        )
        pause_for_test("saved", f"saved-step-{state.optimizer_step}")  # every rank's files written, the manifest not yet
        write_manifest(ckpt, reported)
        prune(root, keep, state.best_step)

    try:
        reported = write_rank_files(engine, root, ckpt)
        dist.main_first(finish)
    except (OSError, RuntimeError) as error:  # on every rank: write_rank_files and main_first raise everywhere
        failure = error  # the name `error` is unbound when the except block ends
        dist.main_first(lambda: discard_failed_save(ckpt, run_dir, state.optimizer_step, needed, free, failure))
    return ckpt


def logits_tolerance(precision: str) -> float:
    """How far logits of the same weights may be apart when computed another way.

    fp32: the same weights and arithmetic, up to summation order. 16-bit: the live engine computes
    with 16-bit weights while a reloaded export holds the fp32 master weights.
    """
    return 1e-4 if precision == "fp32" else 5e-2


def supersede_later(ckpt: Path) -> Path | None:
    """Move the checkpoints after `ckpt` (the branch a run resumed from `ckpt` abandons) aside into
    `checkpoints/superseded-after-step-N-TIME/`, so the resumed run owns every later step and
    `--resume auto` never picks the old branch. Returns that directory, or None if there were none."""
    later = [p for p in ckpt.parent.glob("step-*") if step_of(p.with_name(p.name.split(".")[0])) > step_of(ckpt)]
    if not later:
        return None
    aside = ckpt.parent / f"superseded-after-{ckpt.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    aside.mkdir()
    for path in later:  # step-N and its step-N.universal conversion
        os.replace(path, aside / path.name)
    return aside


BYTES_PER_PARAMETER = 16  # the first save's estimate: weights, ZeRO's fp32 copy and Adam's two moments


def space_needed(root: Path, engine) -> int:
    """About the bytes the next checkpoint takes: the size of the newest complete one, else an estimate."""
    complete = scan(root)[0]
    if complete:
        return sum(entry["size"] for entry in read_json(complete[0] / MANIFEST)["files"].values())
    return BYTES_PER_PARAMETER * sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters())


def no_space(step: int, where: Path, needed: int, free: int) -> CheckpointError:
    sizes = (
        f"about {needed / 1e6:,.1f} MB needed, {free / 1e6:,.1f} MB free"
        if needed > free
        else f"{free / 1e6:,.1f} MB were free, more than the {needed / 1e6:,.1f} MB it was estimated to need"
    )
    return CheckpointError(f"checkpoint step {step} not written: no space left on the output file system ({where}): {sizes}")


def require_space(run_dir: Path, step: int, needed: int) -> tuple[int, int]:
    """(needed, free) bytes; refuses to start a save that cannot fit, before it touches anything."""
    free = shutil.disk_usage(run_dir).free
    if free < needed:
        raise no_space(step, run_dir, needed, free)
    return needed, free


def write_rank_files(engine, root: Path, ckpt: Path) -> list[str]:
    """Every rank writes its DeepSpeed files and RNG state; a failure on any rank is raised on all.

    Returns the names of the files under `ckpt` that the ranks see, each its own at least."""
    try:
        engine.save_checkpoint(str(root), tag=ckpt.name, save_latest=False)
    except (OSError, RuntimeError) as e:  # torch reports a full disk as RuntimeError ("unexpected pos")
        error = e
        # save_checkpoint ends in a barrier, where ranks whose writes succeeded are waiting: without
        # this one the collectives below would pair with the wrong ones and hang.
        dist.barrier()
    else:
        try:
            write_json(ckpt / f"rng-rank{dist.rank()}.json", rng_state())
            error = None
        except OSError as e:
            error = e
    # A gather, not a barrier: every rank's files are on disk before rank 0 declares the checkpoint
    # complete, and every rank learns of a failure instead of waiting for a rank that gave up.
    errors = dist.all_gather_objects(error and f"rank {dist.rank()}: {type(error).__name__}: {error}")
    if any(errors):
        raise RuntimeError("; ".join(e for e in errors if e))
    # Now that all writes are done (no temporary names left), each rank names what it sees, its own
    # files at least: rank 0's node may not list another node's yet.
    return sorted({name for names in dist.all_gather_objects(_files(ckpt)) for name in names})


def discard_failed_save(ckpt: Path, run_dir: Path, step: int, needed: int, free: int, error: Exception) -> None:
    """Say why a save failed; out of space, also remove what it wrote, to give the space back.

    Otherwise (a rank died, say) the partial stays for the record: resume skips it, prune removes it.
    """
    if shutil.disk_usage(run_dir).free >= needed:
        raise error
    shutil.rmtree(ckpt, ignore_errors=True)
    raise no_space(step, run_dir, needed, free) from error


def prune(root: Path, keep: int, best_step: int | None) -> None:
    """Keep the newest `keep` complete checkpoints (and the best one); drop older partial ones."""
    complete, partial = scan(root)
    newest = step_of(complete[0])
    for ckpt in complete[keep:] + [p for p in partial if step_of(p) < newest]:
        if step_of(ckpt) != best_step:
            shutil.rmtree(ckpt)
            shutil.rmtree(ckpt.with_name(ckpt.name + ".universal"), ignore_errors=True)


def to_universal(ckpt: Path) -> Path:
    """The checkpoint in DeepSpeed's universal format, which loads on any world size.

    Converted once by `ds_to_universal` into a sibling directory (STEP.universal; built under a
    name of this process's own and renamed, so an interrupted conversion is redone, never used, and
    a conversion another job runs at the same time is left alone: the first one in place is used).
    """
    target = ckpt.with_name(ckpt.name + ".universal")
    if not target.is_dir():
        tmp = ckpt.with_name(f"{ckpt.name}.universal.tmp-{unique_suffix()}")
        # --inject_missing_state: the version marker Megatron-style clients store; ours has none.
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "deepspeed.checkpoint.ds_to_universal",
                "--input_folder",
                str(ckpt),
                "--output_folder",
                str(tmp),
                "--num_extract_workers",
                "1",
                "--num_merge_workers",
                "1",
                "--inject_missing_state",
            ],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointError(f"{ckpt}: conversion to DeepSpeed's universal format failed:\n{done.stderr[-2000:]}")
        try:
            os.replace(tmp, target)
        except OSError:  # another job's conversion got there first
            if not target.is_dir():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def load(engine, ckpt: Path, same_world_size: bool) -> None:
    """Restore DeepSpeed state (and, on the same world size, each rank's RNG) from a verified checkpoint.

    On another world size the engine must have been built with checkpoint.load_universal.
    """
    dist.main_first(lambda: verify_manifest(ckpt))
    source = ckpt if same_world_size else Path(dist.main_first(lambda: str(to_universal(ckpt))))
    path, _ = engine.load_checkpoint(str(source.parent), tag=source.name)
    if path is None:  # DeepSpeed only warns when it finds nothing
        raise CheckpointError(f"{source}: DeepSpeed found no checkpoint to load")
    if same_world_size:
        set_rng_state(read_json(ckpt / f"rng-rank{dist.rank()}.json"))
    replay_cpu_adam_steps(getattr(engine.optimizer, "optimizer", engine.optimizer))


def replay_cpu_adam_steps(optimizer) -> None:
    """Give DeepSpeed's native CPU Adam the hidden state an uninterrupted run has at this step.

    The C++ Adam behind FusedAdam on the CPU accelerator and behind DeepSpeedCPUAdam (optimizer
    offload) keeps beta1^t and beta2^t as float32 between calls and multiplies them by beta once
    per step; in a fresh process its first call computes them with pow() instead. The two differ
    in the last bit for some t (beta1 = 0.9 at t = 9, 12, 14, 16, ...; beta2 = 0.999 at 3, 6 and
    every t from 19 to 40), so a run resumed there took slightly different steps from then on (a
    checkpoint holds no C++ state). Calling the kernel for steps 1..N on a one-element dummy
    repeats the uninterrupted run's multiplications; CUDA's FusedAdam computes pow() every step.
    """
    from deepspeed.accelerator import get_accelerator
    from deepspeed.ops.adam import DeepSpeedCPUAdam, FusedAdam
    from deepspeed.ops.adam.fused_adam import multi_tensor_applier

    if isinstance(optimizer, DeepSpeedCPUAdam):

        def call(step, group, p, g, m, v):
            optimizer.ds_opt_adam.adam_update(
                optimizer.opt_id,
                step,
                group["lr"],
                *group["betas"],
                group["eps"],
                group["weight_decay"],
                group["bias_correction"],
                p,
                g,
                m,
                v,
            )
    elif isinstance(optimizer, FusedAdam) and get_accelerator().device_name() == "cpu":

        def call(step, group, p, g, m, v):
            multi_tensor_applier(
                optimizer.multi_tensor_adam,
                optimizer._dummy_overflow_buf,
                [[g], [p], [m], [v]],
                group["lr"],
                *group["betas"],
                group["eps"],
                step,
                optimizer.adam_w_mode,
                int(group["bias_correction"]),
                group["weight_decay"],
            )
    else:
        return
    steps = next((int(s["step"]) for s in optimizer.state.values() if "step" in s), 0)
    dummy = [torch.zeros(1) for _ in range(4)]  # param, grad, exp_avg, exp_avg_sq
    for step in range(1, steps + 1):
        # Every group, as step() visits them (ZeRO-3 lends each its parameters only during step()):
        # groups with other betas make the kernel recompute pow(), as they did in the uninterrupted run.
        for group in optimizer.param_groups:
            call(step, group, *dummy)


def load_weights(engine, ckpt: Path) -> None:
    """Put a complete checkpoint's weights into the live engine (every rank), to evaluate them.

    Consolidated from its ZeRO shards as the export is, so any stage and any world size will do
    (also a checkpoint saved before a resume on another world size). Only rank 0 reads them, and
    lazily: under ZeRO-3 each parameter is assembled from the shards as it is copied
    (zero_to_fp32's lazy mode), under ZeRO-1/2 zero_to_fp32 concatenates the fp32 partitions once.
    The parameters go in one at a time: under ZeRO-3 each is gathered, set on rank 0 and partitioned
    again from rank 0's values (GatheredParameters with modifier_rank=0), so no GPU holds more than
    one whole parameter beyond its partitions; below ZeRO-3 every rank holds it whole and rank 0's
    is broadcast. Buffers are not trained and stay the engine's. Only the module changes: the
    optimizer keeps the last step's state, so this is for after training.
    """
    import deepspeed
    import torch.distributed as td

    saved = {}
    dist.main_first(lambda: saved.update(weights_for(engine.module, ckpt)))  # an error reaches every rank
    with torch.no_grad():
        for name, param in engine.module.named_parameters():  # the same order on every rank
            with deepspeed.zero.GatheredParameters([param], modifier_rank=0):  # no-op below ZeRO-3
                if dist.is_main():
                    param.data.copy_(saved[name].contiguous())
            if not hasattr(param, "ds_id"):  # not a ZeRO-3 parameter: rank 0's values to the others
                td.broadcast(param.data.view(-1).view(torch.uint8), src=0)  # as bytes, as DeepSpeed does: any dtype


def weights_for(module, ckpt: Path) -> dict:
    """Rank 0's: `ckpt`'s fp32 weights (lazy, see load_weights), verified and checked against
    `module`'s parameters before any collective copies them."""
    verify_manifest(ckpt)
    saved = fp32_state_dict(ckpt, lazy=True)
    wanted = {name: tuple(getattr(p, "ds_shape", p.shape)) for name, p in module.named_parameters()}
    found = {name: tuple(saved[name].shape) for name in wanted if name in saved}
    if found != wanted:
        differ = sorted(name for name in wanted if found.get(name) != wanted[name])
        raise CheckpointError(f"{ckpt}: its weights do not fit this model: missing or other shapes for {differ[:5]}")
    return saved


# ----------------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------------


def fp32_state_dict(ckpt: Path, lazy: bool = False) -> dict:
    """fp32 weights from a ZeRO checkpoint directory (one tag), any original world size; `lazy`:
    zero_to_fp32's lazy mode (ZeRO-3 values assembled by `.contiguous()`)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    # zero_to_fp32 prints its progress unconditionally; keep the console to our own lines.
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name, lazy_mode=lazy)


def consolidated_fp32_state_dict(ckpt: Path) -> dict[str, torch.Tensor]:
    """Full fp32 weights, each its own tensor (ZeRO-1/2's are views of one vector; safetensors
    refuses shared memory)."""
    return {name: tensor.detach().clone().contiguous() for name, tensor in fp32_state_dict(ckpt).items()}
