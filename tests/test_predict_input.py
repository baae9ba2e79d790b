"""`predict`'s --input and --output (pipeline/cli/predict.py): the records predicted are never overwritten."""

import os

from helpers import SAMPLE, read_jsonl, write_jsonl

from pipeline.cli.main import main


def test_predict_refuses_an_output_that_is_its_input(initial_model, tmp_path, monkeypatch, capsys):
    notes = write_jsonl(tmp_path / "notes.jsonl", read_jsonl(SAMPLE / "dev.jsonl")[:4])
    before = notes.read_bytes()
    os.link(notes, tmp_path / "same-notes.jsonl")
    monkeypatch.chdir(tmp_path)
    for output in (str(notes), "notes.jsonl", "./same-notes.jsonl"):  # the same file by any path
        assert main(["predict", "--model", str(initial_model), "--input", str(notes), "--output", output]) == 2
        assert f"--output {output} is the --input file {notes}: writing the predictions would replace" in capsys.readouterr().err
    assert notes.read_bytes() == before
    assert main(["predict", "--model", str(initial_model), "--input", str(notes), "--output", "predictions.jsonl"]) == 0
    assert len(read_jsonl(tmp_path / "predictions.jsonl")) == 4 and notes.read_bytes() == before
