"""A launch's inputs, checked on this machine before any rank starts: the data files, the model
directory and the output directory, one line each.

Every rank would find the same mistakes, but only after the doctor, the runner and a torch import
(seconds to minutes), and once per rank. Only what is cheap is checked here: the first record of
each file (its columns), the model's config.json, a test file in the output directory. Reading every
record stays with rank 0's data preparation.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
from pathlib import Path

from ..core.base import ConfigError, load_json, mask_credentials, network_file_system
from ..core.model_dir import check_model_dir, has_tokenizer, has_weights
from ..core.options import TRACKER_INSTALL, TRACKERS, TrainConfig, mlflow_uri
from ..data.cache import text_file_paths
from ..data.readers import iter_records, require_columns


def check_data_file(path: str, columns: list[str], encoding: str) -> str:
    """The file exists, its format is known and its first record has the columns."""
    first = next(iter_records(path, encoding=encoding))  # the generator closes the file when dropped
    require_columns(Path(path), [first], columns)
    return f"{path} (columns {', '.join(columns)} present)"


def check_model(cfg: TrainConfig) -> str:
    """config.json parses, names a model type this transformers knows, and fits --max-length."""
    check_model_dir(cfg.model, cfg.max_length)
    config = load_json(Path(cfg.model) / "config.json")
    from transformers import CONFIG_MAPPING

    model_type = config.get("model_type")
    if model_type not in CONFIG_MAPPING:
        raise ConfigError(
            f"model: {cfg.model}/config.json has model_type {model_type!r}, which this transformers does not know; "
            "a model directory saved by transformers' save_pretrained has one"
        )
    weights = "pretrained weights" if has_weights(cfg.model) else "no weights (initialised from its config)"
    texts = "text files" if cfg.text_file else "training texts"
    tokenizer = "its tokenizer" if has_tokenizer(cfg.model) else f"a {cfg.vocabulary} vocabulary built from the {texts}"
    return f"{cfg.model} ({model_type}, {weights}, {tokenizer})"


def check_output_dir(path: str) -> str:
    """The directory can be created and written (a test file, removed at once)."""
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=path, prefix=".write-test-")
        os.close(fd)
        os.unlink(name)
    except OSError as e:
        raise ConfigError(f"output directory {path} is not writable: {e.strerror}") from None
    return f"{Path(path).resolve()} (writable)"


def check_trackers(cfg: TrainConfig, environ=os.environ) -> None:
    """The launch's check: each chosen tracker is installed, an MLflow tracking server answers, and
    a warning where the MLflow store is a SQLite file on a network file system."""
    for name in cfg.trackers():
        if importlib.util.find_spec(TRACKERS[name]) is None:
            raise ConfigError(f"--report-to {name}: the {TRACKERS[name]} package is not installed ({TRACKER_INSTALL[name]})")
    if "mlflow" not in cfg.trackers():
        return
    uri = mlflow_uri(cfg, environ)
    if uri.startswith(("http://", "https://")):
        check_mlflow_server(uri, environ)
    elif uri.startswith("sqlite:///") and (kind := network_file_system(uri.removeprefix("sqlite:///"))):
        print(
            f"launch: warning: --report-to mlflow: the MLflow store {mask_credentials(uri)} is a SQLite file on a network "
            f"file system ({kind}), where SQLite's locking is not reliable and concurrent runs can corrupt it; on a shared "
            "cluster, run one MLflow server per team (its store on the server's own disk or a database) and set "
            "MLFLOW_TRACKING_URI=http(s)://that-server"
        )


def check_mlflow_server(uri: str, environ) -> None:
    """The tracking server answers its health endpoint, asked through MLflow's own request helper as a
    rank's MLflow client will ask it: TLS verified with MLFLOW_TRACKING_SERVER_CERT_PATH (else with
    REQUESTS_CA_BUNDLE, which requests reads, else the system's CAs), not at all with
    MLFLOW_TRACKING_INSECURE_TLS=true, a client certificate from MLFLOW_TRACKING_CLIENT_CERT_PATH.
    Any HTTP answer, a 401 or 403 too, proves the server is there. No message shows the URI's credentials."""
    import requests
    from mlflow.exceptions import MlflowException
    from mlflow.utils.rest_utils import MlflowHostCreds, http_request

    shown = mask_credentials(uri)
    for name in ("MLFLOW_TRACKING_SERVER_CERT_PATH", "MLFLOW_TRACKING_CLIENT_CERT_PATH"):
        if environ.get(name) and not Path(environ[name]).is_file():
            raise ConfigError(f"--report-to mlflow: {name}={environ[name]}: file not found")
    try:
        creds = MlflowHostCreds(
            uri,
            ignore_tls_verification=environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() in ("true", "1"),
            client_cert_path=environ.get("MLFLOW_TRACKING_CLIENT_CERT_PATH") or None,
            server_cert_path=environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH") or None,
        )
    except MlflowException:
        raise ConfigError(
            "--report-to mlflow: MLFLOW_TRACKING_INSECURE_TLS and MLFLOW_TRACKING_SERVER_CERT_PATH are both set; "
            "MLflow takes one of them: the CA certificate to verify the server with, or no verification"
        ) from None
    try:
        http_request(creds, "/health", "GET", max_retries=0, timeout=10, raise_on_status=False).close()
    except MlflowException as e:
        cause = e.__context__ or e  # MLflow wraps the requests error without chaining it explicitly
        hint = ""
        if isinstance(cause, requests.exceptions.SSLError):
            hint = (
                "its TLS certificate is not trusted here: set MLFLOW_TRACKING_SERVER_CERT_PATH (or REQUESTS_CA_BUNDLE) "
                "to the PEM file of the certificate authority that signed it; "
            )
        raise ConfigError(
            f"--report-to mlflow: the MLflow tracking server MLFLOW_TRACKING_URI={shown} does not answer "
            f"({mask_credentials(str(cause))}); {hint}start it (mlflow server --backend-store-uri sqlite:///mlflow.db "
            "--host 127.0.0.1 --port 5000), fix the variable, or leave mlflow out of --report-to"
        ) from None


def check_inputs(cfg: TrainConfig, label_column: bool = True) -> list[str]:
    """One line per input, or the first ConfigError."""
    columns = [cfg.text_column, *([cfg.label_column] if label_column else [])]
    files = [("train", cfg.train_file), ("dev", "" if cfg.val_size else cfg.dev_file), ("test", cfg.test_file)]
    if cfg.text_file:  # pretrain reads unlabelled text files, not the labelled ones
        files, columns = [("text", str(path)) for path in text_file_paths(cfg.text_file)], [cfg.text_column]
    lines = [f"{name} data: {check_data_file(path, columns, cfg.encoding)}" for name, path in files if path]
    if cfg.val_size:
        lines.append(f"dev data: --val-size {cfg.val_size} of {cfg.train_file}, stratified by label, seed {cfg.seed}")
    lines.append(f"model: {check_model(cfg)}")
    lines.append(f"output: {check_output_dir(cfg.output_dir)}")
    return lines
