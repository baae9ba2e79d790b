"""A real MLflow tracking server (`mlflow server`, SQLite backend, served artifacts) on a loopback
port, stopped at the end of the session, and a run that reports to it and to the other trackers."""

from __future__ import annotations

import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from helpers import ds_config, free_port, launch, require, train_args


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory) -> str:
    """The tracking URI (http://127.0.0.1:PORT) of a running `mlflow server`."""
    require("mlflow", install="pip install -c constraints.txt '.[mlflow]'", needs_root=False)
    root = tmp_path_factory.mktemp("mlflow-server")
    uri = f"http://127.0.0.1:{free_port()}"
    command = ["mlflow", "server", "--host", "127.0.0.1", "--port", uri.rsplit(":", 1)[1], "--workers", "1"]
    command += ["--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "artifacts")]
    log = open(root / "server.log", "wb")
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180  # the first start creates the database's tables
        while True:
            try:
                urllib.request.urlopen(f"{uri}/health", timeout=5).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"mlflow server did not start: {(root / 'server.log').read_text()[-3000:]}")
                time.sleep(1)
        yield uri
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


@pytest.fixture(scope="session")
def tracked_run(tmp_path_factory, small_data, mlflow_server) -> tuple[Path, dict]:
    """(run directory, environment) of a 2-rank run reporting to every tracker (TensorBoard, the
    MLflow server, W&B offline): 4 steps, then resumed from its last checkpoint for 2 more, with the run's
    own TF-IDF baseline beside its evaluations (RUN_DIR/eval/baseline.json)."""
    tmp = tmp_path_factory.mktemp("tracked")
    config = ds_config(tmp / "ds.json", 2, micro=4, accum=2)
    env = {"MLFLOW_TRACKING_URI": mlflow_server, "MLFLOW_EXPERIMENT_NAME": "tracked", "WANDB_MODE": "offline"}
    options = "--max-length 64 --eval-every 2 --save-every 2 --log-every 1 --report-to all --baseline tfidf".split()
    for extra in (["--max-steps", "4"], ["--max-steps", "6", "--resume", "auto"]):
        result = launch(train_args(config, small_data, tmp, "run", *options, *extra), env=env)
        assert result.returncode == 0, f"training failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return tmp / "run", env
