"""The sample-data generator's unlabelled notes (domain-adaptive pretraining's "unlabelled rest")."""

import json
import subprocess
import sys

from helpers import REPO, SAMPLE

from pipeline.tools.generate_sample_data import unlabelled_rows


def test_unlabelled_notes_are_new_notes_of_the_sets_kind_without_labels():
    for mode, train_file in (("default", "train.jsonl"), ("long", "long_train.jsonl"), ("multilabel", "multilabel_train.jsonl")):
        rows = unlabelled_rows(mode, 50)
        assert rows == unlabelled_rows(mode, 50)  # seeded
        assert all(set(row) == {"text"} and row["text"] for row in rows)
        train = {json.loads(line)["text"] for line in (SAMPLE / train_file).read_text(encoding="utf-8").splitlines()}
        assert not train & {row["text"] for row in rows}, mode  # their own stream, not the labelled notes again
        lengths = sorted(len(row["text"]) for row in rows)
        train_lengths = sorted(len(text) for text in train)
        assert abs(lengths[25] - train_lengths[len(train_lengths) // 2]) < 0.3 * train_lengths[len(train_lengths) // 2], mode


def generate(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "pipeline.tools.generate_sample_data", *args]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=60)


def test_unlabelled_writes_only_to_out_and_without_out_is_refused_in_one_line(tmp_path):
    result = generate("--unlabelled", "5")
    assert result.returncode == 2 and "--unlabelled needs --out" in result.stderr and "Traceback" not in result.stderr
    result = generate("--unlabelled", "-3", "--out", str(tmp_path / "never.jsonl"))
    assert result.returncode == 2 and "--unlabelled must be a number of notes" in result.stderr
    written = tmp_path / "u.jsonl"
    result = generate("--mode", "long", "--unlabelled", "5", "--out", str(written))
    assert result.returncode == 0, result.stderr
    assert [json.loads(line) for line in written.read_text(encoding="utf-8").splitlines()] == unlabelled_rows("long", 5)
