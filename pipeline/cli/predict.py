"""Predict with an exported model: `python -m pipeline predict --model RUN_DIR/export`.

Input: a data file with a text column (any format training reads: .jsonl, .json, .csv, .tsv,
.parquet), a .txt file with one text per line, or texts on stdin (one per line). Lines end at \n,
\r\n or \r only (see readers.text_lines), so line numbers are the ones an editor shows. Output: one
JSON line per input line or record, in input order, with its line number (.txt, stdin) or record
number and id (data files) and what the model's task predicts (tasks.base.Task.output): e.g. for a
single-label model the label and all class probabilities; for a multi-label model (trained with
--task multi_label) `labels`, the set of labels whose probability reaches its threshold (the
export's thresholds.json, or --thresholds FILE), and each label's probability. A blank line or empty
text gets a row with its prediction null, so rows stay aligned with the input. Texts are read,
batched and pooled by evaluation's code (TokenizedSplit, evaluate.record_logits) with the export's
`record_reading`: truncation, or windows whose logits are pooled per text (see reading.py). One
process, no process group.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from .. import tasks
from ..checkpoint.export import load_export
from ..core.base import ConfigError, load_json
from ..data.cache import TOKENIZE_BATCH, TokenizedSplit, in_batches
from ..data.readers import READERS, iter_records, require_columns, text_lines
from ..data.reading import Reading
from ..train.evaluate import record_logits


def _numbered_lines(path, file) -> list[dict]:
    return [{"line": number, "text": line.rstrip("\r\n")} for number, line in text_lines(path, file)]


def read_inputs(input_path: str | None, text_column: str, id_column: str) -> list[dict]:
    """One entry per input line or record: where it is ({"line": n} or {"record": n, "id": ...}) and its text."""
    if input_path is None:
        return _numbered_lines("<stdin>", sys.stdin.buffer)
    path = Path(input_path)
    if path.suffix.lower() == ".txt":
        if not path.is_file():
            raise ConfigError(f"{path}: input file not found")
        with open(path, "rb") as file:
            return _numbered_lines(path, file)
    if path.suffix.lower() not in READERS:
        raise ConfigError(
            f"{path}: unknown input format '{path.suffix}'; predict reads .txt (one text per line), {', '.join(e for e in READERS if e != '.txt')}"
        )
    records = list(iter_records(path))
    require_columns(path, records, [text_column])
    return [
        {"record": n, **({"id": r[id_column]} if id_column in r else {}), "text": r.get(text_column)}
        for n, r in enumerate(records, 1)
    ]


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
    for chunk in in_batches(todo, TOKENIZE_BATCH):  # memory bounded as when a cache is built
        split = TokenizedSplit.from_texts(tokenizer, [texts[i] for i in chunk], how)
        scores = kind.scores(record_logits(model, split, batch_size))
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
