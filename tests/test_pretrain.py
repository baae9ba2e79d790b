"""`pretrain` with real ranks: `./launch.sh pretrain` trains a masked LM on unlabelled records, a
resumed run equals the uninterrupted one bit for bit, and its export fine-tunes with `train --model`
(encoder and tokenizer kept, on one rank in this process); a pretrain export without its tokenizer is
refused before any rank (the launcher in this process)."""

import json
import shutil

import numpy as np
import pytest
from helpers import SAMPLE, ds_config, free_port, launch, launch_sh, losses, output_options, read_jsonl, setup_run, write_jsonl
from safetensors.numpy import load_file
from test_resume import interrupted_copy

from pipeline.core.options import TINY_MODEL_DIR

pytestmark = pytest.mark.ranks  # every test here launches ranks, or reads the launched reference run

# 64 notes as JSONL and 16 as plain text, windows of 64 tokens (long notes give several): 12 steps
# of 4 x 2 x 2 windows, evaluated every 3 on the held-out records and saved every 4.
PRETRAIN_ARGS = ["--max-length", "64", "--max-steps", "12", "--eval-every", "3", "--save-every", "4", "--keep-checkpoints", "20"]


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    root = tmp_path_factory.mktemp("texts")
    notes = read_jsonl(SAMPLE / "train.jsonl")
    jsonl = write_jsonl(root / "notes.jsonl", [{"text": row["text"]} for row in notes[:64]])
    plain = root / "notes.txt"
    plain.write_text("".join(row["text"] + "\n\n" for row in notes[64:80]), encoding="utf-8")
    return f"{jsonl},{plain}"


def pretrain_args(config, texts, out, name, *extra):
    return ["--ds-config", str(config), "--text-file", texts, *output_options(out, name), *PRETRAIN_ARGS, *extra]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, texts):
    """The uninterrupted run, started as a user would: ./launch.sh pretrain."""
    out = tmp_path_factory.mktemp("pretrain")
    config = ds_config(out / "ds.json", 2, micro=4, accum=2, lr=1e-3)
    result = launch_sh("pretrain", "--master-port", str(free_port()), "--no-doctor", *pretrain_args(config, texts, out, "ref"))
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "Building prefix dict" not in result.stdout + result.stderr  # jieba kept quiet
    return out / "ref", config, result.stdout


def test_pretrain_reports_held_out_loss_and_exports_a_masked_lm(reference):
    run, _, console = reference
    assert "whole-word masking" in console
    evaluations = [row for row in read_jsonl(run / "metrics.jsonl") if row.get("split") == "dev"]
    assert [row["step"] for row in evaluations] == [3, 6, 9, 12]
    assert evaluations[-1]["mlm_loss"] < evaluations[0]["mlm_loss"]  # it learns
    assert evaluations[-1]["perplexity"] == pytest.approx(np.exp(evaluations[-1]["mlm_loss"]))
    config = json.loads((run / "export" / "config.json").read_text())
    assert config["architectures"] == ["BertForMaskedLM"] and config["problem_type"] == "masked_lm"
    assert any(name.startswith("cls.predictions") for name in load_file(run / "export" / "model.safetensors"))


def test_pretrain_resumed_equals_uninterrupted(reference, texts, tmp_path):
    ref, config, _ = reference
    copy = interrupted_copy(ref, tmp_path / "interrupted", 8)
    result = launch(
        ["pretrain", *pretrain_args(config, texts, tmp_path, "interrupted", "--resume", str(copy / "checkpoints" / "step-8"))]
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "resumed from" in result.stdout
    assert losses(copy) == losses(ref)
    mine, theirs = load_file(copy / "export" / "model.safetensors"), load_file(ref / "export" / "model.safetensors")
    assert mine.keys() == theirs.keys() and all((mine[k] == theirs[k]).all() for k in theirs)
    assert json.loads((copy / "eval_results.json").read_text()) == json.loads((ref / "eval_results.json").read_text())


def test_the_export_fine_tunes_with_its_encoder_and_tokenizer(reference, one_rank, tmp_path):
    """`train --model EXPORT` on the in-process engine of one rank: what the export gives the model
    and the tokenizer does not depend on the world size."""
    ref, _, _ = reference
    run = setup_run(one_rank, tmp_path, micro=4, accum=2, lr=1e-4, model=str(ref / "export"), max_length=64, max_steps=8)
    run.train()
    run.finish()
    export = tmp_path / "run" / "export"
    pretrained, finetuned = load_file(ref / "export" / "model.safetensors"), load_file(export / "model.safetensors")
    name = "bert.embeddings.word_embeddings.weight"
    assert pretrained[name].shape == finetuned[name].shape
    # The encoder starts from the pretrained weights (a fresh one would be uncorrelated with them).
    assert np.corrcoef(pretrained[name].ravel(), finetuned[name].ravel())[0, 1] > 0.9
    assert "classifier.weight" in finetuned
    assert (export / "tokenizer.json").read_text() == (ref / "export" / "tokenizer.json").read_text()


def test_a_pretrain_export_without_its_tokenizer_is_refused_before_the_ranks(reference, small_data, tmp_path, refuse):
    """`./launch.sh` refuses it in this process (reaching the doctor or the runner fails the test)."""
    ref, _, _ = reference
    model = tmp_path / "model"
    shutil.copytree(ref / "export", model)
    (model / "tokenizer.json").unlink(), (model / "tokenizer_config.json").unlink()
    _, err = refuse(
        "--accelerator", "cpu", "--model", str(model),
        "--train-file", str(small_data["train"]), "--dev-file", str(small_data["dev"]), "--output-dir", str(tmp_path),
    )  # fmt: skip
    assert err.strip().splitlines() == [err.strip()]  # one line
    assert f"launch: error: model: {model} was trained with its own tokenizer" in err


def test_pretrain_resumes_on_another_world_size(texts, tmp_path):
    """2 ranks, then 1 from step 8 (universal checkpoint): each row is masked the same whatever rank
    it falls on. Without dropout only the order of floating-point sums differs from the
    uninterrupted run."""
    model = tmp_path / "no-dropout"
    model.mkdir()
    config = json.loads((TINY_MODEL_DIR / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}))
    accum = {2: 2, 1: 4}  # 4 per rank x accum x ranks = 16
    settings = ("--model", str(model), "--eval-every", "0", "--save-every", "8")  # no evaluation read; step 8 saved
    ds = ds_config(tmp_path / "ds.json", 2, micro=4, accum=accum[2])
    result = launch(["pretrain", *pretrain_args(ds, texts, tmp_path, "ref", *settings)], ranks=2)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ref = tmp_path / "ref"
    copy = interrupted_copy(ref, tmp_path / "interrupted", 8)
    resume = ("--resume", str(copy / "checkpoints" / "step-8"))
    result = launch(["pretrain", *pretrain_args(ds, texts, tmp_path, "interrupted", *settings, *resume)], ranks=1)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "global batch kept at 16 = 4 x 4 accumulation x 1" in output
    resumed, reference_curve = losses(copy), losses(ref)
    assert len(resumed) == len(reference_curve) == 12
    assert max(abs(a - b) for a, b in zip(resumed, reference_curve)) < 1e-5, (resumed, reference_curve)
    mine, theirs = load_file(copy / "export" / "model.safetensors"), load_file(ref / "export" / "model.safetensors")
    assert max(abs(mine[k] - theirs[k]).max() for k in theirs) < 1e-5
