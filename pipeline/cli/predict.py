"""Predict with an exported model: `python -m pipeline predict --model RUN_DIR/export`.

Input: a data file with a text column (any format training reads: .jsonl, .json, .csv, .tsv,
.parquet, .xlsx; text decoded with --encoding, UTF-8 by default), a .txt file with one text per line, or texts on stdin (one per line). Lines end at \n,
\r\n or \r only (see readers.text_lines), so line numbers are the ones an editor shows. Output: one
JSON line per input line or record, in input order, with its line number (.txt, stdin) or record
number and id (data files) and what the model's task predicts (tasks.base.Task.output): e.g. for a
single-label model the label and all class probabilities; for a multi-label model (trained with
--task multi_label) `labels`, the set of labels whose probability reaches its threshold (the
export's thresholds.json, or --thresholds FILE), and each label's probability. A blank line or empty
text gets a row with its prediction null, so rows stay aligned with the input. Texts are read,
batched and pooled by evaluation's code (TokenizedSplit, evaluate.record_logits) with the export's
`record_reading`: truncation, or windows whose logits are pooled per text (see reading.py), each
chunk of texts run longest first (less padding; rows still come out in input order). One process,
no process group: on a GPU when there is one (--device), in fp32 unless --precision says otherwise.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from .. import tasks
from ..checkpoint.export import load_export
from ..core.base import ConfigError, is_text_encoding, load_json
from ..core.dist import Progress
from ..core.ds_config import native_bf16
from ..data.cache import TOKENIZE_BATCH, TokenizedSplit, in_batches
from ..data.readers import READERS, iter_records, require_columns, text_lines
from ..data.reading import Reading
from ..train.evaluate import record_logits


def _numbered_lines(path, file, encoding: str) -> list[dict]:
    return [{"line": number, "text": line.rstrip("\r\n")} for number, line in text_lines(path, file, encoding)]


def read_inputs(input_path: str | None, text_column: str, id_column: str, encoding: str = "utf-8") -> list[dict]:
    """One entry per input line or record: where it is ({"line": n} or {"record": n, "id": ...}) and its text,
    text formats decoded with `encoding` (--encoding)."""
    if input_path is None:
        return _numbered_lines("<stdin>", sys.stdin.buffer, encoding)
    path = Path(input_path)
    if path.suffix.lower() == ".txt":
        if not path.is_file():
            raise ConfigError(f"{path}: input file not found")
        with open(path, "rb") as file:
            return _numbered_lines(path, file, encoding)
    if path.suffix.lower() not in READERS:
        raise ConfigError(
            f"{path}: unknown input format '{path.suffix}'; predict reads .txt (one text per line), {', '.join(e for e in READERS if e != '.txt')}"
        )
    records = list(iter_records(path, encoding=encoding))
    require_columns(path, records, [text_column])
    return [
        {"record": n, **({"id": r[id_column]} if id_column in r else {}), "text": r.get(text_column)}
        for n, r in enumerate(records, 1)
    ]


def _predictable(text) -> bool:
    return isinstance(text, str) and bool(text.strip())


DEVICES = ("cuda", "cpu")
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
WEIGHTS = ("model.safetensors", "pytorch_model.bin")
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt")


def check_export_dir(export_dir: str) -> None:
    """One line naming what a directory that is not an exported model lacks, and where the export is."""
    path = Path(export_dir)
    if not path.is_dir():
        raise ConfigError(f"{path}: model directory not found (a run's export is RUN_DIR/export)")
    missing = [
        what
        for what, names in (("config.json", ("config.json",)), ("weights", WEIGHTS), ("tokenizer", TOKENIZER_FILES))
        if not any((path / name).is_file() for name in names)
    ]
    if not missing:
        return
    if (path / "export" / "config.json").is_file():
        where = f"the run's export is {path / 'export'}"
    elif path.name == "hf" and (path.parent / "trainer_state.json").is_file():
        where = f"this is checkpoint {path.parent}'s hf/ directory: export it with `python -m pipeline export {path.parent} OUT`"
    else:
        where = "a run's export is RUN_DIR/export; a checkpoint becomes one with `python -m pipeline export CKPT OUT`"
    raise ConfigError(f"{path}: not an exported model (no {', no '.join(missing)}); {where}")


def choose_device(device: str | None, precision: str) -> torch.device:
    """--device (default: a GPU when there is one), checked against the machine and --precision."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "--device cuda: no GPU is visible to this process (torch.cuda.is_available() is False); use --device cpu"
        )
    if device == "cpu" and precision == "fp16":
        raise ConfigError(
            "--precision fp16 needs --device cuda (half-precision matmuls are slow or missing on CPUs); use bf16 or fp32"
        )
    if device == "cuda" and precision == "bf16" and not native_bf16():
        major, minor = torch.cuda.get_device_capability()
        raise ConfigError(
            f"--precision bf16: {torch.cuda.get_device_name()} (compute capability {major}.{minor}) has no native bf16 "
            "(needs 8.0+; emulated, it is slower and less precise than fp16); use fp16 or fp32"
        )
    return torch.device(device)


@torch.no_grad()
def predict(
    export_dir: str,
    texts: list,
    batch_size: int = 32,
    thresholds: str | None = None,
    device: str | None = "cpu",
    precision: str = "fp32",
    progress=None,
) -> list[dict]:
    """The task's prediction row for each text (e.g. its label and class probabilities), read as in training.

    `device` None: a GPU when there is one. `progress` (a dist.Progress) counts the texts."""
    check_export_dir(export_dir)
    config = load_json(Path(export_dir) / "config.json")  # a syntax error as one line, not a traceback
    kind = tasks.by_problem_type(config.get("problem_type"), export_dir)
    names = kind.config_label_names(config)
    decide = kind.export_thresholds(export_dir, names, thresholds)
    where = choose_device(device, precision)
    tokenizer, model = load_export(export_dir)
    model.to(where, PRECISIONS[precision])  # forward_logits moves each batch to the model's device
    how = Reading.saved(getattr(model.config, "record_reading", None), tokenizer.model_max_length)
    rows = [kind.output(None, None, names) for _ in texts]
    todo = [i for i, text in enumerate(texts) if _predictable(text)]
    for chunk in in_batches(todo, TOKENIZE_BATCH):  # memory bounded as when a cache is built
        split = TokenizedSplit.from_texts(tokenizer, [texts[i] for i in chunk], how)
        logits, _ = record_logits(model, split, batch_size)
        scores = kind.scores(logits)
        for i, prediction, score in zip(chunk, kind.predict(scores, decide), scores):
            rows[i] = kind.output(prediction, score, names)
        if progress is not None:
            progress.update(len(chunk))
    return rows


def check_output(input_path: str | None, output_path: str | None) -> None:
    """--output must not be the --input file (any path to it): the predictions would replace the texts."""
    output = Path(output_path) if output_path else None
    if input_path and output and output.exists() and Path(input_path).exists() and output.samefile(input_path):
        raise ConfigError(
            f"--output {output_path} is the --input file {input_path}: writing the predictions would replace the "
            "records they come from; choose another --output"
        )


def main(args) -> None:
    check_output(args.input, args.output)
    check_export_dir(args.model)  # before reading a large input
    if not is_text_encoding(args.encoding):
        raise ConfigError(f"--encoding {args.encoding}: expected a text encoding Python knows, e.g. utf-8 or gb18030")
    inputs = read_inputs(args.input, args.text_column, args.id_column, args.encoding)
    texts = [entry.pop("text") for entry in inputs]
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size {args.batch_size}: expected at least 1")
    with Progress("predict", len(texts), "texts", log=lambda line: print(line, file=sys.stderr)) as progress:
        predictions = predict(args.model, texts, args.batch_size, args.thresholds, args.device, args.precision, progress)
    lines = "".join(json.dumps({**entry, **row}, ensure_ascii=False) + "\n" for entry, row in zip(inputs, predictions))
    if args.output:
        Path(args.output).write_text(lines, encoding="utf-8")
        print(f"wrote {len(inputs)} predictions to {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(lines)
