"""Session fixtures: training runs that several test modules share (started once, on 2 CPU ranks)."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import (
    CHUNK_SETTINGS,
    EARLY_STOP_SETTINGS,
    REPO,
    SAMPLE,
    STOP_SETTINGS,
    ds_config,
    free_port,
    long_notes,
    read_jsonl,
    train,
    write_jsonl,
)

from pipeline.tasks.single_label import SINGLE_LABEL


@pytest.fixture(scope="session")
def small_data(tmp_path_factory) -> dict:
    """256 training records and 37 dev records (37 does not divide by 2 ranks)."""
    root = tmp_path_factory.mktemp("data")
    return {
        "train": write_jsonl(root / "train.jsonl", read_jsonl(SAMPLE / "train.jsonl")[:256]),
        "dev": write_jsonl(root / "dev.jsonl", read_jsonl(SAMPLE / "dev.jsonl")[:37]),
    }


@pytest.fixture(scope="session")
def multilabel_run(tmp_path_factory) -> Path:
    """A 2-rank multi-label run with balanced class weights on 128 records of the bundled multilabel set,
    37 dev records (odd: one rank gets a filler) and 21 test records; returns its run directory."""
    root = tmp_path_factory.mktemp("multilabel")
    data = {
        "train": write_jsonl(root / "train.jsonl", read_jsonl(SAMPLE / "multilabel_train.jsonl")[:128]),
        "dev": write_jsonl(root / "dev.jsonl", read_jsonl(SAMPLE / "multilabel_dev.jsonl")[:37]),
    }
    test = write_jsonl(root / "test.jsonl", read_jsonl(SAMPLE / "multilabel_test.jsonl")[:21])
    options = ["--task", "multi_label", "--class-weights", "balanced", "--test-file", str(test), "--max-length", "64"]
    options += "--epochs 2 --eval-every 4 --log-every 4 --eval-batch-size 8 --report-to none --baseline tfidf".split()
    return train(root, "run", data, ds_config(root / "ds.json", 2, micro=4, accum=2), extra=options)


@pytest.fixture(scope="session")
def initial_model(tmp_path_factory, small_data) -> Path:
    """A tiny BERT with saved random weights, a tokenizer and no dropout: every run that starts
    from it starts from the same weights, whatever the world size or ZeRO stage."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from pipeline.data.cache import read_split
    from pipeline.data.tokenizer import build_tokenizer, load_tokenizer

    root = tmp_path_factory.mktemp("model")
    train = read_split(str(small_data["train"]), "text", "label", SINGLE_LABEL)
    tokenizer = load_tokenizer(str(build_tokenizer(train.texts, train.split.key, str(root / "cache"))), 128)
    config = AutoConfig.from_pretrained(
        REPO / "pipeline" / "models" / "tiny-bert",
        hidden_size=32,
        intermediate_size=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        vocab_size=len(tokenizer),
        num_labels=len(set(train.labels)),
    )
    import torch

    torch.manual_seed(0)
    model_dir = root / "tiny-init"
    AutoModelForSequenceClassification.from_config(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return model_dir


@pytest.fixture(scope="session")
def uninterrupted(tmp_path_factory, small_data) -> tuple[Path, Path]:
    """(DeepSpeed config, run directory) of STOP_SETTINGS trained without interruption on 2 CPU ranks."""
    tmp = tmp_path_factory.mktemp("uninterrupted")
    config = ds_config(tmp / "ds.json", 2, micro=4, accum=2)
    return config, train(tmp, "run", small_data, config, extra=STOP_SETTINGS)


@pytest.fixture(scope="session")
def chunked_run(tmp_path_factory) -> Path:
    """Run directory of 40 steps on 2 CPU ranks with CHUNK_SETTINGS: 96 training notes and 37 dev
    notes (37 does not divide by 2 ranks; the notes differ in window count)."""
    tmp = tmp_path_factory.mktemp("chunked")
    data = {
        "train": write_jsonl(tmp / "train.jsonl", long_notes(96, 1)),
        "dev": write_jsonl(tmp / "dev.jsonl", long_notes(37, 2)),
    }
    config = ds_config(tmp / "ds.json", 2, micro=4, accum=1, lr=2e-3)
    extra = [*CHUNK_SETTINGS, "--max-steps", "40", "--epochs", "10", "--eval-every", "0", "--report-to", "none"]
    return train(tmp, "run", data, config, extra=extra)


@pytest.fixture(scope="session")
def early_stopped(tmp_path_factory, small_data):
    """early_stopped(stage): (DeepSpeed config, run directory) of EARLY_STOP_SETTINGS on 2 CPU ranks."""
    runs = {}

    def get(stage: int) -> tuple[Path, Path]:
        if stage not in runs:
            tmp = tmp_path_factory.mktemp(f"early-stopped-zero{stage}")
            config = ds_config(tmp / "ds.json", stage, micro=4, accum=2, lr=3e-3)
            runs[stage] = config, train(tmp, "run", small_data, config, extra=EARLY_STOP_SETTINGS)
        return runs[stage]

    return get


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory):
    """A world of one rank in this process, as a launcher would describe it (for `Run.setup`, the
    in-process tier's engine), and small data whose tokenizer and tokenized cache are built once per
    test module: {"train", "dev", "cache"}."""
    root = tmp_path_factory.mktemp("loop")
    env = pytest.MonkeyPatch()
    for key, value in dict(
        DS_ACCELERATOR="cpu", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port())
    ).items():
        env.setenv(key, value)
    data = {
        "train": write_jsonl(root / "train.jsonl", read_jsonl(SAMPLE / "train.jsonl")[:64]),
        "dev": write_jsonl(root / "dev.jsonl", read_jsonl(SAMPLE / "dev.jsonl")[:16]),
        "cache": root / "cache",
    }
    yield data
    env.undo()
