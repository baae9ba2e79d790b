"""Shared fixtures: small data cut from the bundled sample, DeepSpeed configs, and a launcher
that starts real ranks with the real `deepspeed` runner on DeepSpeed's CPU accelerator."""
from __future__ import annotations

import json
import os
import socket
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "pipeline" / "sample_data"


def cpu_env() -> dict:
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    env.pop("RANK", None), env.pop("WORLD_SIZE", None)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.fixture(scope="session")
def small_data(tmp_path_factory) -> dict:
    """256 training records and 37 dev records (37 does not divide by 2 ranks)."""
    root = tmp_path_factory.mktemp("data")
    return {
        "train": write_jsonl(root / "train.jsonl", read_jsonl(SAMPLE / "train.jsonl")[:256]),
        "dev": write_jsonl(root / "dev.jsonl", read_jsonl(SAMPLE / "dev.jsonl")[:37]),
    }


def ds_config(path: Path, stage: int, micro: int, accum: int, lr: float = 1e-3, **extra) -> Path:
    """A small fp32 config: AdamW with a constant learning rate, ZeRO `stage`."""
    cfg = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": 1.0,
        "optimizer": {"type": "AdamW", "params": {"lr": lr, "weight_decay": 0.01}},
        "zero_optimization": {"stage": stage},
        "steps_per_print": 1000000,
        **extra,
    }
    path.write_text(json.dumps(cfg), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def initial_model(tmp_path_factory, small_data) -> Path:
    """A tiny BERT with saved random weights, a tokenizer and no dropout: every run that starts
    from it starts from the same weights, whatever the world size or ZeRO stage."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from pipeline.data import file_digest, read_split
    from pipeline.model import build_wordpiece_tokenizer, load_tokenizer

    root = tmp_path_factory.mktemp("model")
    train = read_split(str(small_data["train"]), "text", "label", str(root / "cache"))
    tokenizer = load_tokenizer(str(build_wordpiece_tokenizer(train.texts, file_digest(train.path), str(root / "cache"))), 128)
    config = AutoConfig.from_pretrained(REPO / "pipeline" / "models" / "tiny-bert", hidden_size=32, intermediate_size=64,
                                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                        vocab_size=len(tokenizer), num_labels=len(set(train.labels)))
    import torch

    torch.manual_seed(0)
    model_dir = root / "tiny-init"
    AutoModelForSequenceClassification.from_config(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return model_dir


def launch(args: list[str], ranks: int = 2, timeout: int = 300, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """`deepspeed --num_gpus RANKS --module pipeline ARGS` on CPU ranks; output captured."""
    cmd = ["deepspeed", "--num_gpus", str(ranks), "--master_port", str(free_port()), "--module", "pipeline", *args]
    return subprocess.run(cmd, cwd=cwd, env=cpu_env(), capture_output=True, text=True, timeout=timeout)


def train(tmp_path: Path, name: str, data: dict, config: Path, ranks: int = 2, extra: list[str] = ()) -> Path:
    """Run training to completion and return its run directory (fails the test on a non-zero exit).

    The launcher's console output is kept next to it, in NAME.console.txt."""
    args = ["train", "--ds-config", str(config), "--train-file", str(data["train"]), "--dev-file", str(data["dev"]),
            "--output-dir", str(tmp_path), "--run-name", name, "--cache-dir", str(tmp_path / "cache"), *extra]
    result = launch(args, ranks=ranks)
    assert result.returncode == 0, f"training failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    (tmp_path / f"{name}.console.txt").write_text(result.stdout + result.stderr, encoding="utf-8")
    return tmp_path / name
