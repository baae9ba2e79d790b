"""Predict labels with an exported model: `python -m pipeline predict --model RUN_DIR/export`.

Input: a .jsonl/.csv file with a text column, a .txt file with one text per line, or texts on
stdin (one per line). Output: one JSON line per text with the label and all class probabilities.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from .checkpoint import load_export
from .config import ConfigError
from .data import FORMATS, read_split


def read_texts(input_path: str | None, text_column: str) -> list[str]:
    if input_path is None:
        return [line.rstrip("\n") for line in sys.stdin if line.strip()]
    path = Path(input_path)
    if path.suffix.lower() in FORMATS:
        import tempfile

        with tempfile.TemporaryDirectory() as cache:
            return read_split(str(path), text_column, None).texts
    if not path.is_file():
        raise ConfigError(f"{path}: input file not found")
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@torch.no_grad()
def predict(export_dir: str, texts: list[str], batch_size: int = 32) -> list[dict]:
    """Label and class probabilities for each text, truncated as in training."""
    if not (Path(export_dir) / "config.json").is_file():
        raise ConfigError(f"{export_dir}: not an exported model (no config.json)")
    tokenizer, model = load_export(export_dir)
    names = [model.config.id2label[i] for i in range(model.config.num_labels)]
    rows = []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(texts[start:start + batch_size], truncation=True, padding=True, return_tensors="pt")
        probabilities = model(**batch).logits.float().softmax(dim=-1)
        for p in probabilities:
            rows.append({"label": names[int(p.argmax())], "probabilities": {n: round(float(v), 6) for n, v in zip(names, p)}})
    return rows


def main(args) -> None:
    rows = predict(args.model, read_texts(args.input, args.text_column), args.batch_size)
    lines = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    if args.output:
        Path(args.output).write_text(lines, encoding="utf-8")
        print(f"wrote {len(rows)} predictions to {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(lines)
