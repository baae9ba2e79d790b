"""Predict with an exported model: `python -m pipeline predict --model RUN_DIR/export`.

Input: a .jsonl/.json/.csv file with a text column, a .txt file with one text per line, or texts
on stdin (one per line). Output: one JSON line per input line or record, in input order, with its
line number (.txt, stdin) or record number and id (data files) and what the model's task predicts
(tasks.base.Task.output): e.g. for a single-label model the label and all class probabilities; for a
multi-label model (trained with --task multi_label) `labels`, the set of labels whose probability
reaches its threshold (the export's thresholds.json, or --thresholds FILE), and each label's
probability. A blank line or empty text gets a row with its prediction null, so rows stay aligned
with the input. Texts are read as in training (the export's `record_reading`: truncation, or windows
whose logits are pooled per text; see reading.py).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from .. import tasks
from ..checkpoint.export import load_export
from ..core.base import ConfigError, load_json
from ..data.readers import FORMATS, read_records, require_columns
from ..data.reading import Reading, encode, pool


def read_inputs(input_path: str | None, text_column: str, id_column: str) -> list[dict]:
    """One entry per input line or record: where it is ({"line": n} or {"record": n, "id": ...}) and its text."""
    if input_path is None:
        return [{"line": n, "text": line} for n, line in enumerate(sys.stdin.read().splitlines(), 1)]
    path = Path(input_path)
    if path.suffix.lower() in FORMATS:
        records = read_records(path)
        require_columns(path, records, [text_column])
        return [
            {"record": n, **({"id": r[id_column]} if id_column in r else {}), "text": r.get(text_column)}
            for n, r in enumerate(records, 1)
        ]
    if not path.is_file():
        raise ConfigError(f"{path}: input file not found")
    return [{"line": n, "text": line} for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)]


def _predictable(text) -> bool:
    return isinstance(text, str) and bool(text.strip())


@torch.no_grad()
def predict(export_dir: str, texts: list, batch_size: int = 32, thresholds: str | None = None) -> list[dict]:
    """The task's prediction row for each text (e.g. its label and class probabilities), read as in training."""
    if not (Path(export_dir) / "config.json").is_file():
        raise ConfigError(f"{export_dir}: not an exported model (no config.json)")
    config = load_json(Path(export_dir) / "config.json")  # a syntax error as one line, not a traceback
    kind = tasks.by_problem_type(config.get("problem_type"), export_dir)
    names = kind.config_label_names(config)
    decide = kind.export_thresholds(export_dir, names, thresholds)
    tokenizer, model = load_export(export_dir)
    how = Reading.saved(getattr(model.config, "record_reading", None), tokenizer.model_max_length)
    rows = [kind.output(None, None, names) for _ in texts]
    todo = [i for i, text in enumerate(texts) if _predictable(text)]
    for start in range(0, len(todo), batch_size):
        chunk = todo[start : start + batch_size]
        inputs, record = encode(tokenizer, [texts[i] for i in chunk], how)
        # One forward per batch_size windows: a chunk of long texts may have many.
        windows = [
            model(**tokenizer.pad({k: v[w : w + batch_size] for k, v in inputs.items()}, return_tensors="pt")).logits
            for w in range(0, len(record), batch_size)
        ]
        scores = kind.scores(pool(torch.cat(windows).float().numpy(), record, how.pool))
        for i, prediction, score in zip(chunk, kind.predict(scores, decide), scores):
            rows[i] = kind.output(prediction, score, names)
    return rows


def main(args) -> None:
    inputs = read_inputs(args.input, args.text_column, args.id_column)
    predictions = predict(args.model, [entry.pop("text") for entry in inputs], args.batch_size, args.thresholds)
    lines = "".join(json.dumps({**entry, **row}, ensure_ascii=False) + "\n" for entry, row in zip(inputs, predictions))
    if args.output:
        Path(args.output).write_text(lines, encoding="utf-8")
        print(f"wrote {len(inputs)} predictions to {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(lines)
