"""--report-to: a 2-rank run and its resumed continuation read back from a real MLflow server
(MlflowClient), W&B's offline run files and TensorBoard's event files; an unreachable MLflow
server refused before any rank starts; a tracker that cannot start leaves training alone."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from helpers import free_port, read_jsonl

from pipeline.core.base import ConfigError
from pipeline.core.options import TrainConfig
from pipeline.launch.inputs import check_trackers
from pipeline.train.tracking import flatten


def history(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """(training rows, dev evaluation rows) of the run's metrics.jsonl."""
    rows = read_jsonl(run_dir / "metrics.jsonl")
    return [r for r in rows if "split" not in r], [r for r in rows if r.get("split") == "dev"]


def tracker_runs(run_dir: Path) -> dict:
    """The tracker run ids kept in the last checkpoint's trainer state."""
    return json.loads((run_dir / "checkpoints" / "step-6" / "trainer_state.json").read_text())["tracker_runs"]


@pytest.mark.ranks
def test_mlflow_server_holds_the_runs_params_metrics_at_their_steps_and_files_and_the_resumed_run_appends(tracked_run):
    from mlflow import MlflowClient

    run_dir, env = tracked_run
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    (run,) = client.search_runs([client.get_experiment_by_name("tracked").experiment_id])  # one run, resumed or not
    assert run.info.run_id == tracker_runs(run_dir)["mlflow"] and run.info.run_name == "run"
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["train.seed"] == "42" and params["train.max_steps"] == "4"  # the first run's, kept
    assert params["ds.zero_optimization.stage"] == "2" and params["ds.world_size"] == "2"
    assert params["ds.optimizer.params.lr"] == "0.001"

    train, dev = history(run_dir)
    losses = client.get_metric_history(run.info.run_id, "train/loss")
    assert [(m.step, m.value) for m in losses] == [(r["step"], r["loss"]) for r in train]
    assert [m.step for m in losses] == [1, 2, 3, 4, 5, 6]
    accuracy = client.get_metric_history(run.info.run_id, "dev/accuracy")
    assert [(m.step, m.value) for m in accuracy] == [(r["step"], r["accuracy"]) for r in dev] and len(dev) == 3
    final = json.loads((run_dir / "eval_results.json").read_text())
    for label, row in final["dev"]["per_class"].items():
        assert run.data.metrics[f"dev/recall/{label}"] == pytest.approx(row["recall"])
    baseline = json.loads((run_dir / "eval" / "baseline.json").read_text())  # the run's own TF-IDF baseline
    assert run.data.metrics["baseline/dev/macro_f1"] == baseline["dev"]["macro_f1"]
    assert run.data.tags["export"] == str((run_dir / "export").resolve())

    files = {f.path for f in client.list_artifacts(run.info.run_id)}
    assert {"eval_results.json", "README.md", "images"} <= files
    assert len(client.list_artifacts(run.info.run_id, "images")) >= 3  # a confusion matrix per dev evaluation
    downloaded = client.download_artifacts(run.info.run_id, "eval_results.json", str(run_dir.parent))
    assert json.loads(Path(downloaded).read_text()) == final


def wandb_records(path: Path):
    """The protobuf records of a W&B run file (run-ID.wandb): a 7-byte W&B header, then LevelDB's log
    format (32 KiB blocks of chunks, each with a 7-byte header: CRC, length, type full/first/middle/last)."""
    from wandb.proto import wandb_internal_pb2

    data, records, pending = path.read_bytes(), [], b""
    assert data[:4] == b":W&B"
    position = 7
    while position + 7 <= len(data):
        room = 32768 - position % 32768
        if room < 7:  # a block's tail too short for a header is padding
            position += room
            continue
        length, kind = struct.unpack("<HB", data[position + 4 : position + 7])
        chunk, position = data[position + 7 : position + 7 + length], position + 7 + length
        if kind == 0:  # zero padding at the block's end
            position += 32768 - position % 32768 if position % 32768 else 0
            continue
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


@pytest.mark.ranks
def test_wandb_offline_run_files_hold_the_metrics_and_config_of_both_runs_under_one_id(tracked_run):
    run_dir, _ = tracked_run
    run_id = tracker_runs(run_dir)["wandb"]
    files = sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 2 and all(f.name == f"run-{run_id}.wandb" for f in files)  # the resumed run kept the id
    steps, config = {}, {}
    for path in files:
        for record in wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "history":
                row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
                if "train/loss" in row:
                    steps[row["_step"]] = row["train/loss"]
            elif kind == "config":
                config.update({item.key: json.loads(item.value_json) for item in record.config.update})
    train, _ = history(run_dir)
    assert steps == {r["step"]: pytest.approx(r["loss"]) for r in train} and sorted(steps) == [1, 2, 3, 4, 5, 6]
    assert config["train.seed"] == 42 and config["ds.zero_optimization.stage"] == 2


@pytest.mark.ranks
def test_tensorboard_events_hold_hparams_per_class_scalars_and_the_confusion_image(tracked_run):
    from matplotlib.image import imread
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    run_dir, _ = tracked_run
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0}).Reload()
    content = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hparams = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    assert hparams["train.seed"].number_value == 42 and hparams["ds.zero_optimization.stage"].number_value == 2
    labels = json.loads((run_dir / "eval_results.json").read_text())["dev"]["per_class"]
    assert {f"dev/recall/{label}" for label in labels} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4, 5, 6]
    images = events.Images("dev/confusion_matrix")
    assert [e.step for e in images] == [2, 4, 6]
    import io

    picture = imread(io.BytesIO(images[-1].encoded_image_string), format="png")
    assert picture.shape[0] > 300 and picture.shape[1] > 300 and picture.std() > 0.05  # drawn, not blank


def test_an_unreachable_mlflow_server_is_refused_in_one_line_before_any_rank_starts(tmp_path, monkeypatch, refuse):
    uri = f"http://127.0.0.1:{free_port()}"
    out = tmp_path / "out"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    stdout, stderr = refuse("--no-doctor", "--accelerator", "cpu", "--report-to", "tensorboard,mlflow", "--output-dir", str(out))
    (line,) = stderr.strip().splitlines()
    assert line.startswith(
        f"launch: error: --report-to mlflow: the MLflow tracking server MLFLOW_TRACKING_URI={uri} does not answer"
    )
    assert "ranks use" not in stdout and not out.exists()


def test_check_trackers_refuses_an_mlflow_server_that_does_not_answer_and_lets_others_through():
    uri = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ConfigError, match="does not answer"):
        check_trackers(TrainConfig(report_to="mlflow"), {"MLFLOW_TRACKING_URI": uri})
    check_trackers(TrainConfig(report_to="tensorboard"), {"MLFLOW_TRACKING_URI": uri})  # not chosen: not asked
    check_trackers(TrainConfig(report_to="none"), {})


@pytest.mark.ranks
def test_a_tracker_that_cannot_start_is_reported_once_and_the_others_go_on(tmp_path, monkeypatch, caplog):
    """Started on a rank without the launcher's check: an MLflow server gone away is a warning, not an error."""
    import logging

    from pipeline.train.tracking import Trackers

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    log = logging.getLogger("test-tracking")
    with caplog.at_level(logging.WARNING, logger="test-tracking"):
        trackers = Trackers(TrainConfig(report_to="mlflow,tensorboard", output_dir=str(tmp_path)), tmp_path / "run", 0, {}, log)
    assert [t.name for t in trackers.active] == ["tensorboard"]
    (warning,) = [record.getMessage() for record in caplog.records if record.name == "test-tracking"]
    assert warning.startswith("warning: --report-to mlflow: could not start") and "training goes on" in warning
    trackers.metrics({"train/loss": 1.0}, 1)
    trackers.close()
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))


def test_report_to_takes_hugging_face_names_lists_all_and_none():
    assert TrainConfig().trackers() == ["tensorboard"]
    assert TrainConfig(report_to="mlflow, tensorboard").trackers() == ["mlflow", "tensorboard"]
    assert TrainConfig(report_to="none").trackers() == []
    assert "tensorboard" in TrainConfig(report_to="all").trackers()
    with pytest.raises(ConfigError, match="'report_to' = 'tensorbord'.*tensorboard, mlflow, wandb"):
        TrainConfig(report_to="tensorbord")


def test_configs_are_flattened_into_parameters_as_hugging_face_does():
    assert flatten({"ds": {"zero_optimization": {"stage": 2}, "fp16": {}}, "seed": 1}) == {
        "ds.zero_optimization.stage": 2,
        "ds.fp16": {},
        "seed": 1,
    }
