"""Watching a run: TensorBoard events, `plot`, and the flops profiler's output, from a real run (one rank in this process)."""

import json

import pytest
from helpers import read_jsonl, setup_run

from pipeline.cli.main import main


@pytest.mark.slow
def test_run_directory_has_tensorboard_events_flops_profile_and_plots(one_rank, tmp_path, capsys):
    """Rank 0 writes all of these: a run on the in-process engine of one rank, then `plot` in this process."""
    options = dict(max_length=64, max_steps=6, eval_every=3, flops_profiler_step=2, report_to="tensorboard")
    run = setup_run(one_rank, tmp_path, micro=4, accum=2, **options)
    run.train()
    run.finish()
    run = tmp_path / "run"

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard")).Reload()
    losses = [row["loss"] for row in read_jsonl(run / "metrics.jsonl") if "split" not in row]
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, 7))
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx(losses, rel=1e-6)  # stored as float32
    assert [e.step for e in events.Scalars("dev/accuracy")] == [3, 6]
    assert "Flops Profiler" in (run / "flops_profile.txt").read_text()

    out = tmp_path / "plot.png"
    capsys.readouterr()
    assert main(["plot", str(run), "--output", str(out)]) == 0, capsys.readouterr().err[-2000:]
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from matplotlib.image import imread

    assert imread(out).shape[:2] == (700, 1100)  # 11 x 7 inches at 100 dpi


def test_plot_of_a_directory_without_metrics_says_so(tmp_path, capsys):
    assert main(["plot", str(tmp_path)]) == 2 and "no metrics.jsonl" in capsys.readouterr().err


def test_confusion_png_key_goes_to_the_terminal_only_where_no_installed_font_draws_the_names(tmp_path, capsys):
    from pipeline.cli.plot import plot_confusion
    from pipeline.tasks.single_label import metrics as single_label_metrics
    from pipeline.train.figures import label_font

    matrix = single_label_metrics([0, 1, 1, 2], [0, 1, 2, 2], ["肺炎", "心梗", "哮喘"])["confusion_matrix"]
    out = plot_confusion("dev, step 3 (latest)", matrix, tmp_path / "c.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert ("0: 肺炎" in capsys.readouterr().out) == (label_font(matrix["labels"]) is None)


def test_a_multi_label_run_gets_its_per_label_outcome_counts_drawn(tmp_path):
    """A multi-label evaluation's confusion matrix is one row of (tp, fn, fp, tn) per label."""
    import numpy as np

    from pipeline.cli.plot import dev_confusion, plot_confusion
    from pipeline.tasks.multi_label import MULTI_LABEL

    labels, predicted = np.array([[1, 0], [1, 1], [0, 1]]), np.array([[1, 1], [0, 1], [0, 0]])
    metrics = MULTI_LABEL.metrics(labels, predicted, ["a", "b"], {"a": 0.5, "b": 0.5})
    assert metrics["confusion_matrix"] == {
        "labels": ["a", "b"],
        "columns": ["tp", "fn", "fp", "tn"],
        "counts": [[1, 1, 0, 1], [1, 1, 1, 0]],
    }
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "dev-step-4.json").write_text(json.dumps(metrics))
    title, matrix = dev_confusion(tmp_path)
    assert title == "dev, step 4 (latest)"
    assert plot_confusion(title, matrix, tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_draws_eval_loss_loss_scale_and_the_baseline_from_the_rows_a_run_writes(tmp_path):
    """Evaluation rows carry their own loss (they stay out of the training curves), fp16 rows a loss
    scale, and a baseline run leaves eval/baseline.json: all land on the figure."""
    from pipeline.cli.plot import plot_run, read_metrics, smoothed

    rows = [{"step": s, "epoch": 0, "loss": 2.0 / s, "lr": 1e-3, "grad_norm": 1.0 / s, "loss_scale": 2.0**s} for s in range(1, 9)]
    rows += [{"step": s, "split": "dev", "loss": 1.0 / s, "accuracy": 0.1 * s, "macro_f1": 0.05 * s} for s in (4, 8)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "eval").mkdir()
    baseline = {"name": "tfidf", "description": "", "dev": {"accuracy": 0.6, "macro_f1": 0.5}, "test": {}}
    (tmp_path / "eval" / "baseline.json").write_text(json.dumps(baseline))
    train, evals = read_metrics(tmp_path)
    assert [r["step"] for r in train] == list(range(1, 9)) and [r["step"] for r in evals] == [4, 8]
    assert smoothed([3.0, 3.0, 3.0]) == pytest.approx([3.0, 3.0, 3.0])  # debiased: no ramp up from zero
    assert smoothed([0.0, 10.0]) == pytest.approx([0.0, 1.0 / 0.19])
    assert plot_run(tmp_path, tmp_path / "m.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
