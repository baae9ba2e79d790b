"""Integration tests: real ranks through the real `deepspeed` launcher on DeepSpeed's CPU accelerator."""

import json
import re
from collections import Counter

import numpy as np
import pytest
import torch
from helpers import (
    ds_config,
    early_stop_step,
    launch,
    losses,
    pipeline_command,
    plot,
    read_jsonl,
    setup_run,
    train,
    train_args,
    write_jsonl,
)
from safetensors.numpy import load_file

from pipeline.tasks.multi_label import MULTI_LABEL
from pipeline.tasks.single_label import metrics as single_label_metrics
from pipeline.train.loop import TrainingStopped, check_progress

SHORT = ["--max-length", "64", "--eval-batch-size", "8"]
TRAIN_ARGS = [
    *SHORT,
    "--epochs",
    "3",
    "--eval-every",
    "16",
    "--log-every",
    "4",
    "--save-every",
    "16",
    "--keep-checkpoints",
    "1",
    "--best-metric",
    "macro_f1",
]


def scheduled_config(tmp, stage):
    sched = {"type": "WarmupDecayLR", "params": {"warmup_max_lr": 3e-3, "warmup_num_steps": "auto", "total_num_steps": "auto"}}
    return ds_config(tmp / "ds.json", stage, micro=4, accum=2, lr=3e-3, scheduler=sched)


@pytest.fixture(scope="module")
def stage_runs(tmp_path_factory, small_data):
    """One 2-rank run per ZeRO stage of the default tiny model on 256 records (3 epochs, 48 steps)."""
    runs = {}

    def get(stage):
        if stage not in runs:
            tmp = tmp_path_factory.mktemp(f"zero{stage}")
            runs[stage] = train(tmp, "run", small_data, scheduled_config(tmp, stage), extra=TRAIN_ARGS)
        return runs[stage]

    return get


@pytest.mark.ranks
@pytest.mark.parametrize("stage", [2, 3])
def test_two_rank_run_trains_evaluates_checkpoints_and_exports(stage_runs, small_data, stage, tmp_path):
    run = stage_runs(stage)
    curve = losses(run)
    assert len(curve) == 48  # 256 records / global batch 16 x 3 epochs
    assert np.mean(curve[-8:]) < curve[0] - 0.15, curve  # from ln(10) = 2.30 at random init

    resolved = json.loads((run / "ds_config.json").read_text())
    assert (resolved["train_batch_size"], resolved["world_size"], resolved["zero_optimization"]["stage"]) == (16, 2, stage)
    assert resolved["scheduler"]["params"]["total_num_steps"] == 48
    assert json.loads((run / "train_config.json").read_text())["max_length"] == 64
    # Kept: the newest checkpoint and the one with the best dev macro-F1 among the saved steps 16, 32
    # and 48 (the last step may be the best); that one is exported.
    scores = {step: json.loads((run / "eval" / f"dev-step-{step}.json").read_text())["macro_f1"] for step in (16, 32, 48)}
    best = max(scores, key=lambda step: (scores[step], -step))
    kept = sorted(p.name for p in (run / "checkpoints").glob("step-*"))
    assert kept == sorted({"step-48", f"step-{best}"}), (kept, scores)
    assert json.loads((run / "eval_results.json").read_text())["step"] == best
    # The last checkpoint is saved before the final evaluation (a stop or kill there loses no step):
    # its state knows the periodic evaluations, and the final one is counted again on resume.
    state = json.loads((run / "checkpoints" / "step-48" / "trainer_state.json").read_text())
    assert state["best_step"] == max((16, 32), key=lambda step: (scores[step], -step))
    # The step count, skipped steps and the LR scheduler's position agree with DeepSpeed's own counters.
    states_file = sorted((run / "checkpoints" / "step-48").glob("*mp_rank_00_model_states.pt"))[
        0
    ]  # ZeRO-3 prefixes zero_pp_rank_0_
    engine_state = torch.load(states_file, weights_only=False)
    assert (
        (engine_state["global_steps"], engine_state["skipped_steps"])
        == (state["optimizer_step"], state["skipped_steps"])
        == (48, 0)
    )
    assert engine_state["lr_scheduler"]["last_batch_iteration"] == 48 - 0 - 1  # applied steps, counted from -1
    assert sorted(p.name for p in (run / "eval").iterdir()) == [  # --baseline none: no baseline.json (multilabel_run has one)
        "dev-step-16.json",
        "dev-step-32.json",
        "dev-step-48.json",
    ]
    # Step times leave out evaluating and saving (after steps 16 and 32): the steps after them are not outliers.
    times = {row["step"]: row["step_time_s"] for row in read_jsonl(run / "metrics.jsonl") if "split" not in row}
    assert max(times[17], times[33]) < 3 * np.median(list(times.values())), times

    # The metrics cover exactly the 37 dev records (odd: not divisible by 2 ranks) ...
    results = json.loads((run / "eval_results.json").read_text())["dev"]
    dev = read_jsonl(small_data["dev"])
    names = sorted({r["label"] for r in read_jsonl(small_data["train"])})
    trained_predictions = [r["label"] for r in read_jsonl(run / "predictions-dev.jsonl")]
    assert results["num_records"] == len(trained_predictions) == 37
    single_process = single_label_metrics(
        [names.index(r["label"]) for r in dev], [names.index(p) for p in trained_predictions], names
    )
    assert {k: v for k, v in results.items() if k not in ("loss", "padding_efficiency")} == single_process
    assert 0 < results["loss"] < 10 and 0 < results["padding_efficiency"] <= 1  # what evaluation adds

    # ... and the export, loaded in a plain process by `predict`, reproduces those predictions.
    export = run / "export"
    assert {"model.safetensors", "config.json", "label_map.json", "tokenizer.json"} <= {p.name for p in export.iterdir()}
    assert json.loads((export / "label_map.json").read_text(encoding="utf-8")) == {n: i for i, n in enumerate(names)}
    out = tmp_path / "pred.jsonl"
    pipeline_command("predict", "--model", str(export), "--input", str(small_data["dev"]), "--output", str(out), check=True)
    predicted = read_jsonl(out)
    assert [r["label"] for r in predicted] == trained_predictions
    assert all(abs(sum(r["probabilities"].values()) - 1) < 1e-4 for r in predicted)


@pytest.mark.ranks
def test_every_step_logs_its_gradient_norm(stage_runs):
    rows = [row for row in read_jsonl(stage_runs(2) / "metrics.jsonl") if "split" not in row]
    assert all(np.isfinite(row["grad_norm"]) and row["grad_norm"] > 0 for row in rows), rows[:3]
    assert "loss_scale" not in rows[0]  # fp32: no loss scaler


def test_a_nan_loss_stops_training_naming_the_step(one_rank, sigusr1_kept, tmp_path, capsys, monkeypatch):
    """`zero-pipeline train` in this process (one rank): the documented hook PIPELINE_TEST_NAN_AT_STEP
    makes step 3's loss NaN (fp32 has no loss scaler to skip it): exit 2, one line, steps 1 and 2 logged."""
    from pipeline.cli.main import main

    monkeypatch.setenv("PIPELINE_TEST_NAN_AT_STEP", "3")
    config = ds_config(tmp_path / "ds.json", 2, micro=4, accum=2)
    data = {"train": one_rank["train"], "dev": one_rank["dev"]}
    args = train_args(config, data, tmp_path, "run", *SHORT, "--max-steps", "6", "--eval-every", "0", "--report-to", "none")
    assert main([*args, "--baseline", "none"]) == 2
    out, err = capsys.readouterr()
    assert err.count("error: optimizer step 3 (epoch 0): the training loss is nan") == 1, err[-3000:]
    assert "Traceback" not in out + err
    assert [row["step"] for row in read_jsonl(tmp_path / "run" / "metrics.jsonl")] == [1, 2]


@pytest.mark.ranks
def test_console_shows_each_line_once(stage_runs):
    run = stage_runs(2)
    console = (run.parent / "run.console.txt").read_text(encoding="utf-8")
    for line in ("run directory:", "device: CPU", "eval dev @ step 16:", "step     4  loss", "final dev:", "export (verified):"):
        assert console.count(line) == 1, line
    assert "[rank 1]" not in console


def accumulation_leg(tmp_path, name, data, model, stage, layout, **options):
    """(exported weights, loss curve) of a run from `model` on `data`, ZeRO `stage`, `layout` (ranks,
    micro-batch, accumulation) and `options` (TrainConfig fields, the same for both kinds of leg): 2
    ranks launched; 1 rank in this process, on a real one-rank engine (the test must request the
    `one_rank` fixture, whose world of one it runs in, and `sigusr1_kept`), trained and exported as `train` does."""
    ranks, micro, accum = layout
    options = {"model": str(model), "max_length": 64, "eval_batch_size": 8, "eval_every": 0, **options}
    if ranks == 1:
        out = tmp_path / name
        out.mkdir()
        run = setup_run({**data, "cache": tmp_path / "cache"}, out, micro, accum, stage=stage, **options)
        run.train()
        run.finish()
        run_dir = run.run_dir
    else:
        flags = [word for key, value in options.items() for word in (f"--{key.replace('_', '-')}", str(value))]
        run_dir = train(tmp_path, name, data, ds_config(tmp_path / f"{name}.json", stage, micro, accum), ranks=ranks, extra=flags)
    return load_file(run_dir / "export" / "model.safetensors"), losses(run_dir)


@pytest.mark.ranks
def test_accumulation_equals_the_big_batch(one_rank, sigusr1_kept, initial_model, small_data, tmp_path):
    """2 ranks x micro 4 x accum 2 == 1 rank x micro 4 x accum 4 == 1 rank x micro 16 x accum 1, on ZeRO-2
    and ZeRO-3: the same weights after 5 optimizer steps from the same initial weights (fp32, no dropout).
    Gradient checkpointing (recomputing activations in backward) changes nothing either. One rank's
    accumulation is checked under ZeRO-2 and recomputation under ZeRO-3 (its parameter hooks), which
    keeps the 2-rank partitioned reductions of both stages at two runs less (CI time). The 2-rank legs
    are launched (their ranks are the point); the 1-rank legs run in this process."""
    layouts = {
        2: {"2x4x2": (2, 4, 2), "1x4x4": (1, 4, 4), "1x16x1": (1, 16, 1)},
        3: {"2x4x2": (2, 4, 2), "1x16x1": (1, 16, 1), "2x4x2-recompute": (2, 4, 2)},
    }
    weights, curves = {}, {}
    for stage in (2, 3):
        for name, layout in layouts[stage].items():
            recompute = {"gradient_checkpointing": 1} if name.endswith("recompute") else {}
            leg = accumulation_leg(
                tmp_path, f"z{stage}-{name}", small_data, initial_model, stage, layout, max_steps=5, **recompute
            )
            weights[stage, name], curves[stage, name] = leg
    assert "gradient checkpointing: on" in (tmp_path / "z3-2x4x2-recompute.console.txt").read_text()
    reference = weights[2, "1x16x1"]
    initial = load_file(initial_model / "model.safetensors")
    assert max(np.abs(reference[k] - initial[k]).max() for k in initial) > 1e-3  # the runs did train
    for key, run_weights in weights.items():
        diff = max(np.abs(run_weights[k] - reference[k]).max() for k in reference)
        assert diff < 5e-6, f"ZeRO-{key[0]} {key[1]}: max |weight diff| {diff:.3g} vs ZeRO-2 1x16x1"
        assert np.allclose(curves[key], curves[2, "1x16x1"], rtol=0, atol=1e-5), (key, curves[key], curves[2, "1x16x1"])


@pytest.mark.ranks
def test_bad_input_stops_every_rank_before_training(small_data, tmp_path):
    """Launched: the data check runs on rank 0 after the process group started (dist.main_first), and
    its refusal must reach rank 1, which would otherwise wait for the data: every rank exits, one line."""
    dev = write_jsonl(tmp_path / "dev.jsonl", read_jsonl(small_data["dev"])[:3] + [{"text": "头痛三天", "label": "偏头痛"}])
    config = ds_config(tmp_path / "ds.json", 2, micro=4, accum=2)
    result = launch(train_args(config, {**small_data, "dev": dev}, tmp_path, "run", *SHORT))
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert output.count("label '偏头痛' never appears in the training file") == 1, output[-3000:]
    assert not re.search(r"step +\d+ +loss", output) and "Traceback" not in output


@pytest.mark.parametrize("rank", [0, 1])
def test_config_syntax_error_stops_before_the_process_group(
    one_rank, small_data, tmp_path, capsys, monkeypatch, sigusr1_kept, rank
):
    """Every rank reads the DeepSpeed JSON before the process group starts, so each rank of a 2-rank
    job refuses on its own, waiting on no other: rank 0 says it in one line, rank 1 says nothing.
    (Had the group started first, each rank alone would time out waiting for the other, in 6 s.)"""
    from pipeline.cli.main import main

    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", "2")
    config = tmp_path / "ds.json"
    config.write_text('{\n  "train_micro_batch_size_per_gpu": 4\n  "zero_optimization": {"stage": 2}\n}\n')
    assert main(train_args(config, small_data, tmp_path, "run", "--dist-timeout-minutes", "0.1")) == 2
    out, err = capsys.readouterr()
    assert f"rank {rank} of 2:" not in out  # dist.init prints that line as it starts the group
    said = [f"error: {config}: JSON syntax error at line 3, column 3: Expecting ',' delimiter"]
    assert err.splitlines() == (said if rank == 0 else []), err
    assert "Traceback" not in out + err


def test_progress_check_stops_on_what_the_loss_scaler_did_not_catch():
    check_progress(5, 0, 0.7, fp16=False, skipped=False, at_min_scale=0)
    check_progress(5, 0, float("inf"), fp16=True, skipped=True, at_min_scale=1)  # fp16 overflow: the scaler's job
    with pytest.raises(TrainingStopped, match="optimizer step 5 \\(epoch 0\\): the training loss is nan \\(the weights"):
        check_progress(5, 0, float("nan"), fp16=False, skipped=False, at_min_scale=0)
    with pytest.raises(TrainingStopped, match="the training loss is inf \\(DeepSpeed skipped this update\\)"):
        check_progress(5, 0, float("inf"), fp16=False, skipped=True, at_min_scale=0)  # fp32/bf16: no scaler to fix it
    with pytest.raises(TrainingStopped, match="skipped the last 10 steps at the minimum loss scale"):
        check_progress(9, 0, float("inf"), fp16=True, skipped=True, at_min_scale=10)


def test_metrics_of_an_interrupted_run_drop_a_cut_short_last_line(tmp_path):
    from pipeline.core.base import ConfigError
    from pipeline.train.runlog import metrics_up_to

    class Log(list):
        warning = list.append

    path = tmp_path / "metrics.jsonl"
    rows = "".join(json.dumps({"step": step, "loss": 1.0}) + "\n" for step in (1, 2, 3))
    path.write_bytes(rows.encode() + '{"step": 4, "loss": "损'.encode()[:-1])  # cut inside a character
    log = Log()
    assert metrics_up_to(path, 2, log) == rows.splitlines(keepends=True)[:2]
    assert "dropped its incomplete last line" in log[0]
    path.write_text(rows + "{oops\n" + rows, encoding="utf-8")
    with pytest.raises(ConfigError, match=r"metrics.jsonl: line 4 is not a JSON metrics record"):
        metrics_up_to(path, 2, log)


@pytest.mark.ranks
def test_multi_label_run_evaluates_every_record_once_and_exports_its_dev_thresholds(multilabel_run):
    """2 ranks, --task multi_label --class-weights balanced: metrics over exactly the 37 dev records,
    per-label recall and 2x2 counts, the weights recorded, thresholds tuned on dev and exported."""
    run = multilabel_run
    results = json.loads((run / "eval_results.json").read_text())
    dev, test = results["dev"], results["test"]
    assert (dev["num_records"], test["num_records"]) == (37, 21)
    dev_records = read_jsonl(run.parent / "dev.jsonl")
    names = sorted({name for r in read_jsonl(run.parent / "train.jsonl") for name in r["label"]})
    for name, row in dev["per_class"].items():
        assert row["tp"] + row["fn"] == row["support"] == sum(name in r["label"] for r in dev_records)
        assert row["tp"] + row["fp"] + row["fn"] + row["tn"] == 37 and 0 <= row["recall"] <= 1
    predictions = read_jsonl(run / "predictions-dev.jsonl")
    assert len(predictions) == 37 and all(set(p["labels"]) <= set(names) for p in predictions)
    assert sum(name in p["labels"] for p in predictions) == dev["per_class"][name]["tp"] + dev["per_class"][name]["fp"]
    assert set(dev["thresholds"]) == set(names) and test["thresholds"] == dev["thresholds"]
    # The export has the final dev evaluation's thresholds (the last checkpoint, saved before it, the
    # periodic evaluation's: `export CKPT` gives those).
    assert json.loads((run / "export" / "thresholds.json").read_text()) == dev["thresholds"]
    state = json.loads((run / "checkpoints" / "step-16" / "trainer_state.json").read_text())  # 2 epochs of 8 steps
    assert set(state["thresholds"]) == set(names)
    config = json.loads((run / "export" / "config.json").read_text())
    assert config["problem_type"] == "multi_label_classification"
    train_records = read_jsonl(run.parent / "train.jsonl")
    positives = {name: sum(name in r["label"] for r in train_records) for name in names}
    expected = {name: (128 - n) / n for name, n in positives.items()}
    assert state["class_weights"] == pytest.approx(expected)
    assert json.loads((run / "class_weights.json").read_text()) == pytest.approx(expected)
    evals = [row for row in read_jsonl(run / "metrics.jsonl") if "split" in row]
    assert [(row["split"], row["step"]) for row in evals] == [("dev", 4), ("dev", 8), ("dev", 12), ("dev", 16), ("test", 16)]
    assert all(set(MULTI_LABEL.metric_names) <= set(row) for row in evals)
    console = (run.parent / "run.console.txt").read_text()
    assert console.count("recall per class:") == len(evals) and "class weights (balanced)" in console


@pytest.mark.ranks
def test_a_run_reports_the_tfidf_baseline_beside_the_model(multilabel_run):
    """The baseline, fitted in rank 0's background process with the run's class weights and dev-tuned
    thresholds, is in eval/baseline.json and eval_results.json, and the console sets it beside the model."""
    from pipeline.data.cache import read_split
    from pipeline.train.baseline import evaluate_baseline

    run = multilabel_run
    beside = json.loads((run / "eval" / "baseline.json").read_text(encoding="utf-8"))
    assert json.loads((run / "eval_results.json").read_text(encoding="utf-8"))["baseline"] == beside
    splits = [read_split(str(run.parent / f"{name}.jsonl"), "text", "label", MULTI_LABEL) for name in ("train", "dev", "test")]
    weights = list(json.loads((run / "class_weights.json").read_text(encoding="utf-8")).values())
    names = sorted({name for labels in splits[0].labels for name in labels})
    assert beside == json.loads(json.dumps(evaluate_baseline(MULTI_LABEL, *splits, names, weights, "")))
    console = (run.parent / "run.console.txt").read_text(encoding="utf-8")
    for line in ("baseline: fitting in the background", "final test:", "baseline test:"):
        assert console.count(line) == 1, line
    model, base = (
        json.loads((run / "eval_results.json").read_text(encoding="utf-8"))["test"]["macro_f1"],
        beside["test"]["macro_f1"],
    )
    verdict = "THE BASELINE WINS" if base > model else "the model beats the baseline"
    assert console.count(f"{verdict}: test macro-F1 {model:.4f} for the model, {base:.4f} for the baseline") == 1


@pytest.mark.ranks
def test_class_weighted_accumulation_equals_the_big_batch(one_rank, sigusr1_kept, initial_model, small_data, tmp_path):
    """With --class-weights balanced the loss is the weighted sum over the records divided by their
    count (not by their weight sum), so 2 ranks x micro 4 x accum 2 (launched) still equals 1 rank x
    micro 16 (in this process)."""
    weights, curves = {}, {}
    for name, layout in {"2x4x2": (2, 4, 2), "1x16x1": (1, 16, 1)}.items():
        leg = accumulation_leg(tmp_path, name, small_data, initial_model, 2, layout, max_steps=3, class_weights="balanced")
        weights[name], curves[name] = leg
    diff = max(np.abs(weights["2x4x2"][k] - weights["1x16x1"][k]).max() for k in weights["1x16x1"])
    assert diff < 5e-6, f"max |weight diff| {diff:.3g}"
    assert np.allclose(curves["2x4x2"], curves["1x16x1"], rtol=0, atol=1e-5), curves


@pytest.mark.ranks
@pytest.mark.parametrize("stage", [2, 3])
def test_early_stopping_ends_the_run_and_exports_the_best_checkpoint(early_stopped, small_data, tmp_path, stage):
    """Stopped after 3 checkpointed evaluations without a new best dev macro-F1; the export, the
    final dev evaluation and the predictions are the best checkpoint's (loaded into the engine, under
    ZeRO-3 into its partitions), not the last step's."""
    from pipeline.checkpoint.checkpoints import consolidated_fp32_state_dict

    _, run = early_stopped(stage)
    stop, best = early_stop_step(run, every=2, patience=3)
    assert stop is not None and stop < 96, "macro-F1 kept improving: early stopping never had to act"
    assert max(row["step"] for row in read_jsonl(run / "metrics.jsonl") if "split" not in row) == stop
    console = (run.parent / "run.console.txt").read_text()
    assert f"early stopping after step {stop}: dev macro_f1 did not improve in the last 3 checkpointed evaluations" in console
    assert f"exporting the best checkpoint, step {best}" in console

    results = json.loads((run / "eval_results.json").read_text())
    assert (results["step"], results["last_step"], results["stopped_early"]) == (best, stop, True)
    # The final dev evaluation is of the best weights, loaded into the engine: it repeats step `best`'s.
    assert results["dev"] == json.loads((run / "eval" / f"dev-step-{best}.json").read_text())
    assert results["best_value"] == results["dev"]["macro_f1"]
    exported = load_file(run / "export" / "model.safetensors")
    saved = consolidated_fp32_state_dict(run / "checkpoints" / f"step-{best}")
    assert exported.keys() == saved.keys() and all(np.array_equal(exported[k], saved[k].numpy()) for k in saved)
    last = consolidated_fp32_state_dict(run / "checkpoints" / f"step-{stop}")
    assert not all(torch.equal(last[k], saved[k]) for k in saved)  # the last step's weights were not exported

    # The confusion matrix counts (true, predicted) pairs of the predictions file.
    names = sorted({r["label"] for r in read_jsonl(small_data["train"])})
    pairs = Counter(
        zip((r["label"] for r in read_jsonl(small_data["dev"])), (r["label"] for r in read_jsonl(run / "predictions-dev.jsonl")))
    )
    matrix = results["dev"]["confusion_matrix"]
    assert matrix["labels"] == names
    assert matrix["counts"] == [[pairs[(true, predicted)] for predicted in names] for true in names]
    assert sum(map(sum, matrix["counts"])) == 37

    out = tmp_path / "curves.png"
    plotted = plot(run, "--output", str(out))
    assert plotted.returncode == 0, plotted.stderr[-2000:]
    assert f"plot: {tmp_path / 'curves-confusion.png'}" in plotted.stdout
    assert (tmp_path / "curves-confusion.png").read_bytes()[:8] == out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
