"""Fixtures for every test module: the shared training runs (fixtures_runs.py) and the clusters
(fixtures_cluster.py) and the MLflow tracking server (fixtures_tracking.py). Helpers that tests import are in helpers.py."""

from fixtures_cluster import cluster, slurm
from fixtures_runs import chunked_run, early_stopped, initial_model, multilabel_run, small_data, uninterrupted
from fixtures_tracking import mlflow_server, tracked_run

__all__ = [
    "chunked_run",
    "cluster",
    "early_stopped",
    "initial_model",
    "mlflow_server",
    "multilabel_run",
    "slurm",
    "small_data",
    "tracked_run",
    "uninterrupted",
]
