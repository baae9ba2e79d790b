"""Rank 0's trackers (`--report-to tensorboard,mlflow,wandb|all|none`, Hugging Face's names): where
the run's configuration, training and evaluation scalars, confusion matrices and final files go,
beside metrics.jsonl (runlog.py hands them every row).

Each tracker is a small class with the same methods (params, metrics, image, files, close). A
tracker's package is imported only when it is chosen. A tracker never stops training: one that
fails to start or fails later is reported once and dropped (`Trackers`); only an MLflow server that
cannot be reached at launch is refused, by `check_trackers`, before any rank starts. A resumed run
continues the same tracker runs: their ids are kept in the trainer state of every checkpoint.

Standard variables work as users know them: MLFLOW_TRACKING_URI (default: a SQLite store in
OUTPUT_DIR, `mlflow ui --backend-store-uri sqlite:///OUTPUT_DIR/mlflow.db`), MLFLOW_EXPERIMENT_NAME,
WANDB_PROJECT, WANDB_MODE=offline (then `wandb sync RUN_DIR/wandb/offline-run-*`). A tracking URI's
credentials (https://user:password@host) never reach a message or log: `mask_credentials`.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..core.base import mask_credentials
from ..core.options import TrainConfig, mlflow_uri

PROJECT = "zero-pipeline"  # the MLflow experiment and W&B project unless MLFLOW_EXPERIMENT_NAME / WANDB_PROJECT say


def flatten(tree: dict, prefix: str = "") -> dict:
    """{'a': {'b': 1}} -> {'a.b': 1}: nested configs as tracker parameters (as Hugging Face flattens them)."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def scalar_param(value):
    """A parameter value every tracker takes: numbers, strings and booleans as they are, the rest as text."""
    return value if isinstance(value, (bool, int, float, str)) else str(value)


class TensorBoard:
    """Event files in RUN_DIR/tensorboard: scalars, the run configuration as hparams, images."""

    name = "tensorboard"

    def __init__(self, cfg: TrainConfig, run_dir: Path, start_step: int, run_id: str | None):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step drops the events an interrupted run wrote after its checkpoint: the resumed
        # run's file reads as one uninterrupted run, as metrics.jsonl does.
        self.writer = SummaryWriter(
            str(run_dir / "tensorboard"), purge_step=start_step + 1 if start_step else None, flush_secs=10
        )
        self.run_id = None

    def params(self, params: dict, resumed: bool) -> None:
        from torch.utils.tensorboard.summary import hparams

        # Into this run's own event file: SummaryWriter.add_hparams would start another run directory.
        for summary in hparams(params, {}):
            self.writer._get_file_writer().add_summary(summary)

    def metrics(self, values: dict, step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def image(self, key: str, array, step: int) -> None:
        self.writer.add_image(key, array, step, dataformats="HWC")

    def files(self, paths: list[Path], tags: dict) -> None:
        for key, value in tags.items():
            self.writer.add_text(key, str(value))

    def close(self) -> None:
        self.writer.close()


class MLflow:
    """One MLflow run in MLFLOW_TRACKING_URI's store (server or local), through MlflowClient."""

    name = "mlflow"

    def __init__(self, cfg: TrainConfig, run_dir: Path, start_step: int, run_id: str | None):
        # A server that dies mid-run costs rank 0 seconds per call, not MLflow's minutes of retries
        # (the other ranks wait for it in the next collective).
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        from mlflow import MlflowClient

        uri = mlflow_uri(cfg)
        self.client = MlflowClient(uri)
        if run_id is None:
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME", PROJECT)
            experiment = self.client.get_experiment_by_name(name)
            local = None if "MLFLOW_TRACKING_URI" in os.environ else (Path(cfg.output_dir).resolve() / "mlartifacts").as_uri()
            experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name, local)
            run_id = self.client.create_run(experiment_id, run_name=run_dir.name).info.run_id
        else:
            self.client.update_run(run_id, status="RUNNING")
        self.run_id, self.uri = run_id, uri

    def params(self, params: dict, resumed: bool) -> None:
        from mlflow.entities import Param

        if resumed:  # MLflow keeps a run's first parameters and refuses to change them
            return
        self.client.log_batch(self.run_id, params=[Param(key, str(value)) for key, value in params.items()])

    def metrics(self, values: dict, step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(key, float(value), now, step) for key, value in values.items()])

    def image(self, key: str, array, step: int) -> None:
        self.client.log_image(self.run_id, array, key=key.replace("/", "_"), step=step)

    def files(self, paths: list[Path], tags: dict) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, str(value))
        for path in paths:
            self.client.log_artifact(self.run_id, str(path))

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class WandB:
    """One W&B run (WANDB_PROJECT; WANDB_MODE=offline writes it under RUN_DIR/wandb for `wandb sync`)."""

    name = "wandb"

    def __init__(self, cfg: TrainConfig, run_dir: Path, start_step: int, run_id: str | None):
        import wandb

        self.wandb = wandb
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", PROJECT),
            name=run_dir.name,
            id=run_id,  # None: a new run, W&B picks its id
            resume="allow",
            dir=str(run_dir),
            settings=wandb.Settings(console="off"),  # our console stays ours
        )
        self.run_id = self.run.id

    def params(self, params: dict, resumed: bool) -> None:
        self.run.config.update(params, allow_val_change=True)

    def metrics(self, values: dict, step: int) -> None:
        self.run.log(values, step=step)

    def image(self, key: str, array, step: int) -> None:
        self.run.log({key: self.wandb.Image(array)}, step=step)

    def files(self, paths: list[Path], tags: dict) -> None:
        self.run.summary.update(tags)
        for path in paths:
            self.run.save(str(path), base_path=str(path.parent), policy="now")

    def close(self) -> None:
        self.run.finish()


KINDS = {kind.name: kind for kind in (TensorBoard, MLflow, WandB)}


class Trackers:
    """The chosen trackers on rank 0; a call that fails drops that tracker with one line, and training goes on."""

    def __init__(self, cfg: TrainConfig, run_dir: Path, start_step: int, run_ids: dict, log):
        self.log, self.active = log, []
        for name in cfg.trackers():
            try:
                tracker = KINDS[name](cfg, run_dir, start_step, run_ids.get(name))
            except Exception as e:  # any failure of a tracker's library: a tracker never stops training
                log.warning(
                    f"warning: --report-to {name}: could not start ({type(e).__name__}: {mask_credentials(str(e))}); "
                    "training goes on without it"
                )
                continue
            self.active.append(tracker)
            if tracker.run_id:
                log.info(f"{name}: {'continuing' if run_ids.get(name) else 'started'} run {run_dir.name} (id {tracker.run_id})")
        self.resumed = bool(run_ids)

    @property
    def run_ids(self) -> dict:
        """{tracker: its run's id} to keep in the trainer state: a resumed run continues the same runs."""
        return {tracker.name: tracker.run_id for tracker in self.active if tracker.run_id}

    def __bool__(self) -> bool:
        return bool(self.active)

    def call(self, method: str, *args) -> None:
        for tracker in list(self.active):
            try:
                getattr(tracker, method)(*args)
            except Exception as e:  # a tracker's failure must not stop training: report it once, drop it
                self.active.remove(tracker)
                self.log.warning(
                    f"warning: --report-to {tracker.name} failed ({type(e).__name__}: {mask_credentials(str(e))}); "
                    "no more reports go to it, training goes on"
                )

    def params(self, params: dict) -> None:
        self.call("params", {key: scalar_param(value) for key, value in flatten(params).items()}, self.resumed)

    def metrics(self, values: dict, step: int) -> None:
        if values:
            self.call("metrics", values, step)

    def image(self, key: str, array, step: int) -> None:
        self.call("image", key, array, step)

    def files(self, paths: list[Path], tags: dict) -> None:
        self.call("files", [path for path in paths if path.is_file()], tags)

    def close(self) -> None:
        self.call("close")
