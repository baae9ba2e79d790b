import shutil
from dataclasses import asdict

import pytest
import torch
from safetensors.torch import load_file, save_file

from pipeline.checkpoint import checkpoints
from pipeline.checkpoint.checkpoints import (
    MANIFEST,
    CheckpointError,
    check_compatible,
    check_same_data,
    check_same_settings,
    find_resume_checkpoint,
    prune,
    read_json,
    scan,
    verify_manifest,
    write_manifest,
)
from pipeline.checkpoint.export import ExportError, check_export_target, check_export_weights, load_export, verify_probe
from pipeline.core.base import ConfigError, write_json
from pipeline.train.state import TrainerState, read_state


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


# ---- manifests, resume selection and compatibility (our own JSON files; no DeepSpeed needed) ----


class Log:
    def __init__(self):
        self.lines = []

    def warning(self, line):
        self.lines.append(line)


def fake_checkpoint(root, step, complete=True, labels=("a", "b")):
    ckpt = root / "checkpoints" / f"step-{step}"
    (ckpt / "hf").mkdir(parents=True)
    (ckpt / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"shard" * 100)
    write_json(ckpt / "trainer_state.json", asdict(TrainerState(optimizer_step=step, label_names=list(labels))))
    write_json(
        ckpt / "hf" / "config.json",
        {
            "model_type": "bert",
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "intermediate_size": 64,
            "vocab_size": 100,
        },
    )
    if complete:
        write_manifest(ckpt)
    return ckpt


def test_manifest_refuses_missing_changed_and_unexpected_files(tmp_path):
    ckpt = fake_checkpoint(tmp_path, 4)
    verify_manifest(ckpt)
    shard = ckpt / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    shard.write_bytes(b"shard" * 99 + b"shaRd")  # same size, different content
    with pytest.raises(CheckpointError, match="does not match its checksum"):
        verify_manifest(ckpt)
    shard.unlink()
    with pytest.raises(CheckpointError, match="missing zero_pp_rank_0_mp_rank_00_optim_states.pt"):
        verify_manifest(ckpt)
    ckpt2 = fake_checkpoint(tmp_path, 6)
    (ckpt2 / "zero_pp_rank_1_mp_rank_00_optim_states.pt").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="unexpected zero_pp_rank_1"):
        verify_manifest(ckpt2)
    (ckpt2 / MANIFEST).unlink()
    with pytest.raises(CheckpointError, match="incomplete checkpoint"):
        verify_manifest(ckpt2)


def test_resume_auto_takes_the_newest_complete_and_reports_partials(tmp_path):
    run = tmp_path / "run"
    fake_checkpoint(run, 4)
    newest = fake_checkpoint(run, 8)
    partial = fake_checkpoint(run, 10, complete=False)
    log = Log()
    assert find_resume_checkpoint("auto", str(tmp_path), "run", log) == newest
    assert any(str(partial) in line for line in log.lines)
    assert scan(run / "checkpoints") == ([newest, run / "checkpoints" / "step-4"], [partial])


def test_resume_with_nothing_to_resume(tmp_path):
    fake_checkpoint(tmp_path / "run", 2, complete=False)
    with pytest.raises(CheckpointError, match=r"no complete checkpoint under .*run \(1 incomplete ones ignored\)"):
        find_resume_checkpoint("auto", str(tmp_path), "run", Log())
    assert find_resume_checkpoint("if-present", str(tmp_path), "run", Log()) is None
    with pytest.raises(CheckpointError, match="incomplete checkpoint"):
        find_resume_checkpoint(str(tmp_path / "run" / "checkpoints" / "step-2"), str(tmp_path), "", Log())
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        find_resume_checkpoint(str(tmp_path / "nowhere"), str(tmp_path), "", Log())


def test_checkpoint_of_another_label_set_or_model_is_refused(tmp_path):
    from transformers import BertConfig

    ckpt = fake_checkpoint(tmp_path, 2, labels=("a", "b"))
    model = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=100)
    saved = read_state(ckpt)
    assert saved.optimizer_step == 2
    check_compatible(ckpt, saved, ["a", "b"], model, {})
    with pytest.raises(CheckpointError, match=r"trained with labels \['a', 'b'\], but the data has \['a', 'c'\]"):
        check_compatible(ckpt, saved, ["a", "c"], model, {})
    with pytest.raises(CheckpointError, match=r"trained with class weights none, but this run has \{'a': 0.5, 'b': 2.0\}"):
        check_compatible(ckpt, saved, ["a", "b"], model, {"a": 0.5, "b": 2.0})
    model.problem_type = "multi_label_classification"
    with pytest.raises(CheckpointError, match="different model .*problem_type: checkpoint None vs model multi_label"):
        check_compatible(ckpt, saved, ["a", "b"], model, {})
    model.problem_type, model.hidden_size = None, 64
    with pytest.raises(CheckpointError, match="different model .*hidden_size: checkpoint 32 vs model 64"):
        check_compatible(ckpt, saved, ["a", "b"], model, {})


def test_prune_keeps_newest_and_best(tmp_path):
    run = tmp_path / "run"
    for step in (2, 4, 6, 8):
        fake_checkpoint(run, step)
    fake_checkpoint(run, 3, complete=False)
    prune(run / "checkpoints", keep=2, best_step=2)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-2", "step-6", "step-8"]


@pytest.fixture()
def visible_gpus(monkeypatch):
    """A stand-in for CUDA on this CPU build: `use(count, current)` makes torch see `count` devices
    whose generators are CPU generators (the same get_state/set_state); torch.cuda's own RNG
    functions (get_rng_state, set_rng_state, ..._all) run unchanged on them."""

    def use(count: int, current: int = 0) -> tuple[torch.Generator, ...]:
        generators = tuple(torch.Generator().manual_seed(100 + i) for i in range(count))
        monkeypatch.setattr(torch.cuda, "_initialized", True)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "default_generators", generators)
        for module in (torch.cuda, torch.cuda.random):  # random.py imported these by name
            monkeypatch.setattr(module, "device_count", lambda: count)
            monkeypatch.setattr(module, "current_device", lambda: current)
        return generators

    return use


def test_a_cuda_rng_record_of_more_gpus_than_visible_restores_this_devices_state(visible_gpus):
    """Saved by a rank that saw 2 GPUs (the deepspeed launcher), resumed by one that sees 1 (srun
    --gpus-per-task=1): restoring the whole list raised IndexError."""
    saved = [torch.Generator().manual_seed(seed).get_state().tolist() for seed in (1, 2)]
    record = {**checkpoints.rng_state(), "cuda": saved}  # the format of older checkpoints
    (gpu,) = visible_gpus(1)
    checkpoints.set_rng_state(record)
    assert gpu.get_state().tolist() == saved[0]
    gpus = visible_gpus(4, current=3)  # a list too short for this rank's device: nothing restored
    checkpoints.set_rng_state(record)
    assert [g.get_state().tolist() for g in gpus] == [
        torch.Generator().manual_seed(100 + i).get_state().tolist() for i in range(4)
    ]


def test_a_rank_saves_and_restores_its_own_devices_cuda_rng_state(visible_gpus):
    gpus = visible_gpus(2, current=1)
    record = checkpoints.rng_state()
    assert "cuda" not in record and record["cuda_device"] == gpus[1].get_state().tolist()
    (gpu,) = visible_gpus(1)  # resumed on another layout: the state goes to this rank's device
    checkpoints.set_rng_state(record)
    assert gpu.get_state().tolist() == gpus[1].get_state().tolist()


def test_a_skipped_fp16_step_moves_the_data_on_but_not_the_schedule():
    """DeepSpeed counts a skipped window in global_steps but does not step the LR scheduler."""
    state = TrainerState()
    for skipped in (False, True, False):
        state.advance(steps_per_epoch=2, skipped=skipped)
    assert (state.optimizer_step, state.skipped_steps, state.applied_steps) == (3, 1, 2)
    assert (state.epoch, state.step_in_epoch) == (1, 1)  # the data position counts windows


def test_the_best_value_and_the_evaluations_since_it_are_counted():
    state = TrainerState()
    for step, value in [(2, 0.5), (4, 0.5), (6, 0.7), (8, 0.6), (10, 0.7)]:  # a tie is no improvement
        state.note_evaluation(value, step)
    assert (state.best_metric, state.best_step, state.evaluations_since_best) == (0.7, 6, 2)


def test_a_resumed_state_keeps_the_multilabel_thresholds():
    """Checkpoints saved after a resume and before the next dev evaluation keep them (and so their exports)."""
    state = TrainerState()
    state.continue_from(TrainerState(optimizer_step=6, thresholds={"肺炎": 0.4, "其他": 0.6}))
    assert state.thresholds == {"肺炎": 0.4, "其他": 0.6}


def test_resume_with_another_seed_or_best_metric_is_refused_naming_both(tmp_path):
    saved = TrainerState(train_config={"seed": 5, "best_metric": "macro_f1", "group_by_length": 1})
    check_same_settings(tmp_path, saved, {"seed": 5, "best_metric": "macro_f1", "group_by_length": 1, "epochs": 9})
    with pytest.raises(CheckpointError, match=r"--seed 5 -> 6; --best-metric 'macro_f1' -> 'accuracy'"):
        check_same_settings(tmp_path, saved, {"seed": 6, "best_metric": "accuracy", "group_by_length": 1})


def test_resume_with_grouping_switched_is_refused(tmp_path):
    """Grouping by length changes the epoch's order: a resume mid-epoch would repeat and skip samples."""
    saved = TrainerState(train_config={"seed": 5, "group_by_length": 0})
    with pytest.raises(CheckpointError, match=r"--group-by-length 0 -> 1"):
        check_same_settings(tmp_path, saved, {"seed": 5, "group_by_length": 1, "best_metric": "macro_f1"})


def test_a_checkpoint_from_before_grouping_existed_counts_as_ungrouped(tmp_path):
    """Its train_config has no group_by_length: it was trained in random order, so today's default
    (grouped) would change the order mid-epoch; the current best metric is all it can be compared with."""
    saved = TrainerState(train_config={"seed": 5})
    check_same_settings(tmp_path, saved, {"seed": 5, "group_by_length": 0, "best_metric": "macro_f1"})
    with pytest.raises(CheckpointError, match=r"--group-by-length 0 -> 1"):
        check_same_settings(tmp_path, saved, {"seed": 5, "group_by_length": 1, "best_metric": "macro_f1"})


def test_resume_on_other_training_data_names_what_changed(tmp_path):
    data = {
        "train file content (sha256)": "aa",
        "train records": 256,
        "text_column": "text",
        "label_column": "label",
        "max_length": 64,
        "tokenizer (fingerprint)": "t1",
    }
    saved = TrainerState(train_data=data)
    check_same_data(tmp_path, saved, dict(data), Log())
    with pytest.raises(
        CheckpointError,
        match=r"train file content \(sha256\) 'aa' -> 'bb'; train records 256 -> 96; "
        r"max_length 64 -> 128",
    ):
        changed = {**data, "train file content (sha256)": "bb", "train records": 96, "max_length": 128}
        check_same_data(tmp_path, saved, changed, Log())
    log = Log()
    check_same_data(tmp_path, TrainerState(), data, log)  # a checkpoint from before fingerprints: said, not refused
    assert "not checked" in log.lines[0]


def test_export_replaces_only_an_earlier_export_and_only_when_asked(tmp_path, export):
    check_export_target(tmp_path / "new", overwrite=False)
    (tmp_path / "empty").mkdir()
    check_export_target(tmp_path / "empty", overwrite=False)
    with pytest.raises(ConfigError, match="exists and is not an export"):
        check_export_target(export, overwrite=True)  # model files, but no manifest listing them
    write_manifest(export)
    with pytest.raises(ConfigError, match="already holds an export; .* or pass --overwrite"):
        check_export_target(export, overwrite=False)
    check_export_target(export, overwrite=True)
    (export / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="exists and is not an export"):
        check_export_target(export, overwrite=True)


def test_the_manifest_lists_the_files_the_ranks_report_when_a_listing_misses_them(tmp_path, monkeypatch):
    """On NFS rank 0's cached listing can lack another node's shards; the names the ranks report count."""
    ckpt = fake_checkpoint(tmp_path, 4, complete=False)
    (ckpt / "zero_pp_rank_1_mp_rank_00_optim_states.pt").write_bytes(b"other node" * 10)
    everything = checkpoints._files(ckpt)
    stale = [name for name in everything if "rank_1" not in name]
    monkeypatch.setattr(checkpoints, "_files", lambda _: stale)
    write_manifest(ckpt, everything)
    monkeypatch.undo()
    verify_manifest(ckpt)
    assert "zero_pp_rank_1_mp_rank_00_optim_states.pt" in read_json(ckpt / "manifest.json")["files"]


@pytest.fixture(scope="module")
def saved_run(one_rank, tmp_path_factory):
    """A finished run directory with checkpoints step-1 and step-2 and its export (the one-rank
    engine, in this process)."""
    from helpers import setup_run

    root = tmp_path_factory.mktemp("saved")
    run = setup_run(one_rank, root, max_steps=2, save_every=1)
    run.train()
    run.finish()
    return root / "run"


def export_command(capsys, *args) -> tuple[int, str]:
    """`export ARGS` through the command line's entry point: (exit code, what it printed to stderr)."""
    from pipeline.cli.main import main

    code = main(["export", *map(str, args)])
    return code, capsys.readouterr().err


def test_export_overwrite_replaces_an_export_and_never_a_checkpoint_or_a_run(saved_run, tmp_path, capsys):
    """--overwrite replaces only a directory the export marked as its own: a checkpoint's manifest
    lists all its files too, and the run directory has none."""
    step_1, step_2 = (saved_run / "checkpoints" / f"step-{n}" for n in (1, 2))
    before = sorted(p.name for p in step_1.iterdir())
    for target in (step_1, saved_run):
        code, err = export_command(capsys, step_2, target, "--overwrite")
        assert code == 2 and f"export: {target} exists and is not an export" in err
    assert sorted(p.name for p in step_1.iterdir()) == before
    verify_manifest(step_1)  # every shard and the trainer state still there, unchanged
    target = tmp_path / "export"
    assert export_command(capsys, step_1, target)[0] == 0
    assert read_json(target / MANIFEST)["export_of"] == {"checkpoint": str(step_1.resolve()), "step": 1}
    assert export_command(capsys, step_2, target, "--overwrite")[0] == 0
    assert read_json(target / MANIFEST)["export_of"]["step"] == 2


def test_export_of_an_export_or_a_mistyped_step_names_the_checkpoints_there(saved_run, capsys):
    listing = f"complete checkpoints in {saved_run / 'checkpoints'}: step-1, step-2"
    missing = saved_run / "checkpoints" / "step-999"
    code, err = export_command(capsys, missing, saved_run / "new")
    assert code == 2 and f"export {missing}: does not exist; {listing}" in err
    code, err = export_command(capsys, saved_run / "export", saved_run / "new")  # the run's own export
    assert code == 2 and f"export {saved_run / 'export'}: is an export (a model directory), not a checkpoint" in err
    assert listing in err
    code, err = export_command(capsys, saved_run, saved_run / "new")
    assert code == 2 and f"is not a checkpoint (it has no trainer_state.json); {listing}" in err
    partial = saved_run / "checkpoints" / "step-3"
    shutil.copytree(saved_run / "checkpoints" / "step-2", partial, ignore=shutil.ignore_patterns(MANIFEST))
    try:
        code, err = export_command(capsys, partial, saved_run / "new")
        assert code == 2 and "incomplete checkpoint (no manifest.json: its save was interrupted)" in err
    finally:
        shutil.rmtree(partial)
    assert not (saved_run / "new").exists()


def test_an_export_leaves_another_hosts_export_in_progress_alone(saved_run, tmp_path, capsys):
    """Another login node's export to the same place, under this process's pid (pids repeat across
    hosts), is building EXPORT.tmpPID: ours builds under a name of its own and neither deletes nor
    trips over that one."""
    import os

    target = tmp_path / "export"
    theirs = [target.with_name(f"export.{kind}{os.getpid()}") for kind in ("tmp", "old")]
    for directory in theirs:
        directory.mkdir()
        (directory / "model.safetensors").write_bytes(b"their half-written weights")
    assert export_command(capsys, saved_run / "checkpoints" / "step-2", target)[0] == 0
    assert read_json(target / MANIFEST)["export_of"]["step"] == 2
    assert all((d / "model.safetensors").read_bytes() == b"their half-written weights" for d in theirs)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["export", *(d.name for d in theirs)])


@pytest.mark.slow
def test_a_universal_conversion_leaves_another_jobs_conversion_alone(saved_run, tmp_path):
    """Two jobs resuming one checkpoint on a new world size convert it at the same time: each builds
    under its own name (the first one in place is used), and neither deletes the other's."""
    from pipeline.checkpoint.checkpoints import to_universal

    ckpt = tmp_path / "step-2"
    shutil.copytree(saved_run / "checkpoints" / "step-2", ckpt)
    theirs = tmp_path / "step-2.universal.tmp"
    theirs.mkdir()
    (theirs / "zero").mkdir()
    target = to_universal(ckpt)
    assert target == tmp_path / "step-2.universal" and (target / "zero").is_dir()
    assert (theirs / "zero").is_dir()  # not deleted
    # ours renamed into place (latest_universal is ds_to_universal's own marker)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "latest_universal",
        "step-2",
        "step-2.universal",
        "step-2.universal.tmp",
    ]
    assert to_universal(ckpt) == target  # converted once


def test_the_best_checkpoint_goes_into_zero3_partitions_one_parameter_at_a_time(one_rank, tmp_path, monkeypatch):
    """load_weights (early stopping's best checkpoint, in finish) gathers one ZeRO-3 parameter at a
    time, never the whole model as engine.load_module_state_dict(fetch_z3_params=True) does, and
    leaves exactly the checkpoint's weights in the partitions; a model the weights do not fit is
    refused before any collective."""
    import deepspeed
    from helpers import setup_run

    from pipeline.checkpoint.checkpoints import consolidated_fp32_state_dict, load_weights, weights_for

    run = setup_run(one_rank, tmp_path, stage=3, max_steps=2, save_every=1)  # saves step 1 (finish saves the last)
    run.train()
    params = dict(run.engine.module.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values())):
        last = {name: param.detach().clone() for name, param in params.items()}
    ckpt = tmp_path / "run" / "checkpoints" / "step-1"
    gathered, enter = [], deepspeed.zero.GatheredParameters.__enter__

    def counting_enter(self):
        gathered.append(len(self.params) if self.enabled else 0)
        return enter(self)

    monkeypatch.setattr(deepspeed.zero.GatheredParameters, "__enter__", counting_enter)
    run.engine.empty_partition_cache()  # every parameter back in its partition, as in a big model's run
    load_weights(run.engine, ckpt)
    monkeypatch.undo()
    assert max(gathered) == 1 and len(gathered) == len(params)
    step_1 = consolidated_fp32_state_dict(ckpt)
    with deepspeed.zero.GatheredParameters(list(params.values())):
        for name, param in params.items():
            assert torch.equal(param.detach(), step_1[name]), name
    assert any(not torch.equal(step_1[name], last[name]) for name in params)  # step 1's were not there already
    with pytest.raises(CheckpointError, match=r"its weights do not fit this model: .*\['bias', 'weight'\]"):
        weights_for(torch.nn.Linear(2, 2), ckpt)
